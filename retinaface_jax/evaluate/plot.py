"""Precision-recall (WIDER FACE) and discrete ROC (FDDB) plots; matplotlib is the optional ``plot``
extra, imported only here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retinaface_jax.evaluate.fddb import FDDBRoc
from retinaface_jax.evaluate.widerface_ap import WiderFaceEvaluation
from retinaface_jax.evaluate.widerface_gt import SETTINGS


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib, which is not installed: pip install 'retinaface-jax[plot]' "
            "(or pip install matplotlib)"
        ) from e
    return plt


def require_matplotlib() -> None:
    """Fail early (before a long detection run) with the install hint when matplotlib is missing."""
    _pyplot()


def _finish(fig: Any, ax: Any, path: str | Path, title: str, legend_loc: str) -> Path:
    plt = _pyplot()
    path = Path(path)
    ax.grid(True, alpha=0.3)
    ax.legend(loc=legend_loc)
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_pr_curves(evaluation: WiderFaceEvaluation, path: str | Path, title: str = "") -> Path:
    """Write the easy/medium/hard precision-recall curves, AP in the legend, to ``path``
    (skipped settings, which have no curve, are left out)."""
    fig, ax = _pyplot().subplots(figsize=(6, 5))
    for s in (s for s in SETTINGS if s in evaluation.ap):
        rec, prec = evaluation.recall[s], evaluation.precision[s]
        ok = np.isfinite(prec) & np.isfinite(rec)
        ax.plot(rec[ok], prec[ok], label=f"{s} (AP {evaluation.ap[s]:.4f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    title = title or f"WIDER FACE val ({evaluation.num_images} images)"
    return _finish(fig, ax, path, title, "lower left")


def plot_roc(roc: FDDBRoc, path: str | Path, title: str = "") -> Path:
    """Write the FDDB discrete ROC (true-positive rate against false positives) to ``path``."""
    fig, ax = _pyplot().subplots(figsize=(6, 5))
    ax.step(roc.false_positives, roc.tpr, where="post", label=f"ours ({roc.num_images} images)")
    ax.set_xlabel("false positives")
    ax.set_ylabel("true positive rate")
    ax.set_ylim(0, 1.01)
    title = title or "FDDB discrete ROC (IoU >= 0.5 with the ellipse bounding box)"
    return _finish(fig, ax, path, title, "lower right")
