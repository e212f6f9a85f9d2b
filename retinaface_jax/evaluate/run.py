"""Run a detector over an evaluation image set (batched, progress bar, bad images reported and
skipped) and write the standard prediction files for WIDER FACE and FDDB."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinaface_jax.evaluate.fddb import faces_to_fddb_rows, format_fddb_detections
from retinaface_jax.evaluate.predictions_io import faces_to_rows, write_predictions
from retinaface_jax.evaluate.widerface_gt import WiderFaceGT
from retinaface_jax.inference.preprocess import load_image


def load_detector(
    weights: str | None,
    network: str,
    target_size: int | None,
    max_size: int | None,
    *,
    kernels: str = "auto",
) -> Any:
    """``Detector.from_pretrained`` (imported lazily: evaluating existing files needs no JAX)."""
    from retinaface_jax import Detector

    return Detector.from_pretrained(
        weights or network, target_size=target_size, max_size=max_size, kernels=kernels
    )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def detect_images(
    detector: Any,
    images: Mapping[str, Path],
    rows_of: Callable[[Sequence[Any]], np.ndarray],
    *,
    conf_threshold: float,
    nms_threshold: float,
    batch_size: int = 8,
    on_batch: Callable[[dict[str, np.ndarray]], None] | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Detect faces in ``{key: image path}`` -> (``{key: rows_of(faces)}``, failed keys).

    No top-k limits (as the original evaluation scripts). An unreadable image or a failing batch
    is reported on stderr and skipped; ``on_batch`` receives each batch's rows (to write them
    as they come).
    """
    from tqdm import tqdm

    keys = list(images)
    results: dict[str, np.ndarray] = {}
    failed: list[str] = []

    def run(batch_keys: list[str], arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        faces = detector.detect_batch(
            arrays,
            conf_threshold=conf_threshold,
            nms_threshold=nms_threshold,
            top_k=None,
            keep_top_k=None,
        )
        return {k: rows_of(f) for k, f in zip(batch_keys, faces, strict=True)}

    bar = tqdm(total=len(keys), desc="detecting", unit="img", disable=not progress)
    for start in range(0, len(keys), batch_size):
        chunk, arrays = [], []
        for key in keys[start : start + batch_size]:
            try:
                arrays.append(load_image(images[key]))
                chunk.append(key)
            except (ValueError, OSError) as e:
                _log(f"skipping {images[key]}: {e}")
                failed.append(key)
        batch: dict[str, np.ndarray] = {}
        try:
            batch = run(chunk, arrays) if chunk else {}
        except Exception as e:  # one bad image must not stop the job: retry one by one
            _log(f"batch failed ({e}); retrying its {len(chunk)} images one by one")
            for key, arr in zip(chunk, arrays, strict=True):
                try:
                    batch.update(run([key], [arr]))
                except Exception as e1:
                    _log(f"skipping {images[key]}: detection failed: {e1}")
                    failed.append(key)
        results.update(batch)
        if on_batch is not None and batch:
            on_batch(batch)
        bar.update(len(keys[start : start + batch_size]))
    bar.close()
    return results, failed


def list_widerface_images(images_dir: str | Path) -> dict[str, Path]:
    """``{"event/image": path}`` for every ``<event>/*.jpg`` under ``images_dir`` (sorted)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"WIDER FACE image directory not found: {images_dir}")
    found = {f"{p.parent.name}/{p.stem}": p for p in sorted(images_dir.glob("*/*.jpg"))}
    if not found:
        raise FileNotFoundError(f"no <event>/<image>.jpg files in {images_dir}")
    return found


def widerface_jobs(
    images_dir: str | Path, gt: WiderFaceGT, pred_dir: str | Path, overwrite: bool = False
) -> dict[str, Path]:
    """The val images to detect (``{"event/image": path}``), checked before any work: every image
    must be a WIDER FACE val image and no existing prediction file may be replaced (unless
    ``overwrite``)."""
    images = list_widerface_images(images_dir)
    gt.require_known(images, f"image(s) in {images_dir}")
    pred_dir = Path(pred_dir)
    if not overwrite:
        existing = [k for k in images if (pred_dir / f"{k}.txt").exists()]
        if existing:
            raise FileExistsError(
                f"{len(existing)} prediction file(s) already exist in {pred_dir}, e.g. "
                f"{pred_dir / existing[0]}.txt; use another --pred-dir or --overwrite"
            )
    return images


def detect_widerface(
    detector: Any,
    images: Mapping[str, Path],
    pred_dir: str | Path,
    **options: Any,
) -> tuple[list[Path], list[str]]:
    """Detect on ``{"event/image": path}`` (see :func:`widerface_jobs`) and write
    ``pred_dir/event/image.txt`` as the original test_widerface.py, batch by batch
    -> (files written, failed image keys). ``options``: those of :func:`detect_images`."""
    written: list[Path] = []

    def write(rows: dict[str, np.ndarray]) -> None:
        written.extend(write_predictions(pred_dir, rows, overwrite=True))

    _, failed = detect_images(detector, images, faces_to_rows, on_batch=write, **options)
    return written, failed


def list_fddb_images(images_dir: str | Path, names: Sequence[str]) -> tuple[dict[str, Path], int]:
    """``{fddb name: images_dir/name.jpg}`` for the annotated images present -> (found, missing)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"FDDB image directory not found: {images_dir}")
    found = {n: images_dir / f"{n}.jpg" for n in names if (images_dir / f"{n}.jpg").is_file()}
    return found, len(names) - len(found)


def detect_fddb(
    detector: Any,
    images: Mapping[str, Path],
    out_file: str | Path,
    **options: Any,
) -> list[str]:
    """Detect on FDDB images and write one detection file like the original test_fddb.py
    -> failed image names. ``options``: those of :func:`detect_images`."""
    results, failed = detect_images(detector, images, faces_to_fddb_rows, **options)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(format_fddb_detections({k: results[k] for k in images if k in results}))
    return failed
