"""Our native checkpoint: a directory with ``config.toml`` and an Orbax checkpoint of the model state.

Layout::

    OUT_DIR/config.toml    # the RetinaFaceConfig (retinaface_jax.config.dump_config)
    OUT_DIR/state/         # Orbax StandardCheckpointer: nnx.state(model) as a pure dict

Saving is atomic (Orbax writes to a temporary directory and renames); an existing ``OUT_DIR``
with content is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from retinaface_jax.config import RetinaFaceConfig, dump_config, get_config
from retinaface_jax.models.retinaface import RetinaFace, abstract_model
from retinaface_jax.weights.run_checkpoint import restore_model_state

CONFIG_FILE = "config.toml"
STATE_DIR = "state"


def is_native_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` looks like a directory written by ``save_native``."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / STATE_DIR).is_dir()


def save_native(
    model: nnx.Module, cfg: RetinaFaceConfig, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``model``'s parameters and BatchNorm statistics plus ``cfg`` to ``out_dir``."""
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / STATE_DIR, state)
        checkpointer.wait_until_finished()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_native_config(path: str | os.PathLike) -> RetinaFaceConfig:
    """The config stored in a native checkpoint directory."""
    return get_config(Path(path) / CONFIG_FILE)


def load_native(
    path: str | os.PathLike, backbone: str | None = None, cfg: RetinaFaceConfig | None = None
) -> RetinaFace:
    """Rebuild the model from a native checkpoint (or a training work directory's latest one)."""
    p = Path(path).absolute()
    if not is_native_checkpoint(p):
        cfg_found, state = restore_model_state(p)
    else:
        cfg_found = read_native_config(p)
        state = None
    cfg = cfg if cfg is not None else cfg_found
    if backbone is not None and get_config(backbone).backbone != cfg.backbone:
        raise ValueError(f"{p}: holds a {cfg.backbone} model, but backbone={backbone!r} was asked")
    model = abstract_model(cfg)
    target = nnx.to_pure_dict(nnx.state(model))  # ShapeDtypeStructs
    if state is None:
        # numpy targets: orbax restores host arrays, which is faster
        host = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), target)
        state = ocp.StandardCheckpointer().restore(p / STATE_DIR, host)
    _check_tree(target, state, str(p))
    nnx.update(model, jax.device_put(state))  # not jnp.asarray: a compiled copy per shape
    return model


def _check_tree(want: dict, got: dict, source: str) -> None:
    def shapes(tree: dict) -> dict[str, tuple]:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(k): tuple(getattr(v, "shape", np.shape(v))) for k, v in leaves}

    w, g = shapes(want), shapes(got)
    bad = sorted(k for k in w.keys() | g.keys() if w.get(k) != g.get(k))
    if bad:
        detail = [f"{k}: expected {w.get(k)}, got {g.get(k)}" for k in bad[:20]]
        raise ValueError(f"{source}: checkpoint does not fit the model: " + "; ".join(detail))
