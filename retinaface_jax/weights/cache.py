"""Load a pretrained model by name or path; official weights are converted once to a native checkpoint.

The first ``load_pretrained('mobilenet0.25')`` resolves (or downloads) the original ``.pth``
(``weights.download.resolve_weights``), loads it, and writes the native Orbax checkpoint to
``<cache>/native/<backbone>/`` (via a temporary dir and an atomic rename); later calls load that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.user_cache import cache_dir
from retinaface_jax.weights.download import native_dir, official_name, resolve_weights


def _config_of(model, path: Path, backbone: str | None) -> RetinaFaceConfig:
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, RetinaFaceConfig):
        return cfg
    if path.is_dir() and (path / "config.toml").is_file():
        return get_config(path / "config.toml")
    return get_config(backbone or "mobilenet0.25")


def load_pretrained(
    source: str | os.PathLike = "mobilenet0.25",
    *,
    backbone: str | None = None,
    base_url: str | None = None,
    cache: Path | None = None,
    progress: bool = True,
):
    """``(model in eval mode, config)`` for an official name, a checkpoint file or a native dir."""
    from retinaface_jax.weights.load import load_model

    root = Path(cache) if cache is not None else cache_dir()
    path = resolve_weights(source, base_url=base_url, cache=root, progress=progress)
    name = official_name(str(source)) if isinstance(source, str) else None
    model = load_model(path, backbone if backbone is not None else name)
    cfg = _config_of(model, path, backbone or name)
    if name is not None and path.is_file() and path.parent == root:
        convert_once(model, cfg, native_dir(name, root))
    return model, cfg


def convert_once(model, cfg: RetinaFaceConfig, out_dir: Path) -> Path | None:
    """Save ``model`` as a native checkpoint at ``out_dir`` unless it exists (atomic rename).

    A failure to write the cache is not an error for the caller (returns None).
    """
    from retinaface_jax.weights.native import save_native

    if (out_dir / "config.toml").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        target = tmp / "ckpt"
        save_native(model, cfg, target)
        try:
            os.replace(target, out_dir)
        except OSError:
            if not (out_dir / "config.toml").is_file():
                raise
        return out_dir
    except (OSError, ValueError, RuntimeError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
