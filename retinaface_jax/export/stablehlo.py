"""The whole detection program as ``jax.export`` StableHLO, for serving with plain JAX.

One program per input size ``(H, W)``: uint8 BGR image ``[H, W, 3]`` -> mean subtraction
(``models.mean_subtraction.subtract_mean``) -> the reference model ``RetinaFace`` called as
``model(x)`` (eval mode; never the native CPU kernels) -> decode with the priors of ``H x W`` ->
score filter -> top-k -> greedy NMS with the original's arithmetic (``inference.postprocess``)
-> ``(rows [max_keep, 15] float32, count int32)``, rows ``[x1, y1, x2, y2, score, 10 landmark
coordinates]`` in input pixels, highest score first, valid up to ``count``.

Why fixed sizes: the model builds index tables from its input shape in numpy (the FPN's nearest
upsampling, the CPU convolution's flattened depthwise rows), so it cannot be traced with
symbolic ``H, W``; and on an input padded to a size bucket the plain model is not the unpadded
model near the padded border (only ``backends.planned_forward`` masks it). A program at the
exact image size is the reference detection, bit for bit the computation ``Detector`` runs.

The file is one ``.npz`` (readable with numpy alone): ``meta`` (JSON), the model's weights
``weight_0 .. weight_{n-1}`` (passed as the first argument of every program, so they are
stored once for all sizes) and ``program_{H}x{W}`` (serialized ``jax.export.Exported``
bytes, lowered for every requested platform). Loader recipe (no ``retinaface_jax`` needed)::

    import json, jax, numpy as np
    from jax import export

    f = np.load("retinaface.npz")
    meta = json.loads(str(f["meta"]))
    weights = [f[f"weight_{i}"] for i in range(meta["num_weights"])]
    h, w = image.shape[:2]  # image: uint8 BGR [H, W, 3], a size listed in meta["sizes"]
    program = export.deserialize(bytearray(f[f"program_{h}x{w}"].tobytes()))
    rows, count = program.call(weights, image)
    faces = np.asarray(rows)[: int(count)]  # [x1, y1, x2, y2, score, landmarks...]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from retinaface_jax.config import RetinaFaceConfig
from retinaface_jax.inference.postprocess import (
    nms_rows,
    pixel_priors,
    prior_valid_mask,
    select_candidates,
)
from retinaface_jax.models.flat_state import flat_state
from retinaface_jax.models.mean_subtraction import subtract_mean

__all__ = [
    "DEFAULT_PLATFORMS",
    "DEFAULT_SIZES",
    "FORMAT",
    "detection_program",
    "export_program",
    "export_stablehlo",
    "load_programs",
]

FORMAT = "retinaface_jax.stablehlo/1"
DEFAULT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "tpu")
# common camera / video frame sizes (H, W), both orientations
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (480, 640),
    (640, 480),
    (720, 1280),
    (1280, 720),
    (1080, 1920),
    (1920, 1080),
)
_UNSET: object = object()


def detection_program(
    rebuild: Callable[[Sequence[jax.Array]], Callable],
    cfg: RetinaFaceConfig,
    height: int,
    width: int,
    *,
    conf_threshold: float,
    nms_threshold: float,
    top_k: int | None,
    keep_top_k: int | None,
) -> Callable[[Sequence[jax.Array], jax.Array], tuple[jax.Array, jax.Array]]:
    """``f(weights, image [height, width, 3] uint8 BGR) -> (rows [max_keep, 15], count)``.

    ``rebuild(weights)`` gives the model (``flat_state``); priors, ``k`` and ``max_keep`` are
    those ``Detector.dispatch`` uses for an input of this size (``None`` = no limit).
    """
    priors_np, strides_np = pixel_priors(cfg, height, width)
    num_priors = len(strides_np)
    k = num_priors if top_k is None else min(int(top_k), num_priors)
    max_keep = k if keep_top_k is None else min(int(keep_top_k), k)
    variances = tuple(cfg.variance)

    def program(weights: Sequence[jax.Array], image: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = rebuild(weights)
        x = subtract_mean(image[None], cfg.rgb_mean)
        loc, conf, landms = model(x)
        priors, strides = jnp.asarray(priors_np), jnp.asarray(strides_np)
        valid = prior_valid_mask(priors, strides, jnp.asarray([[height, width]], jnp.int32))
        scores, boxes, lm = select_candidates(
            loc,
            conf,
            landms,
            priors,
            valid,
            jnp.ones((1,), jnp.float32),
            jnp.float32(conf_threshold),
            variances,
            k,
        )
        rows, count = nms_rows(scores, boxes, lm, jnp.float32(nms_threshold), max_keep)
        return rows[0], count[0]

    return program


def export_program(
    program: Callable,
    weights: Sequence[jax.Array],
    height: int,
    width: int,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """``program`` (from :func:`detection_program`) lowered for ``platforms``."""
    specs = [jax.ShapeDtypeStruct(np.shape(w), w.dtype) for w in weights]
    image = jax.ShapeDtypeStruct((height, width, 3), jnp.uint8)
    return jax.export.export(jax.jit(program), platforms=list(platforms))(specs, image)


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for size in sizes:
        ok = len(size) == 2 and all(isinstance(s, int | np.integer) and s > 0 for s in size)
        if not ok:
            raise ValueError(f"sizes: expected (height, width) positive ints, got {size!r}")
        hw = (int(size[0]), int(size[1]))
        if hw not in out:
            out.append(hw)
    if not out:
        raise ValueError("sizes: expected at least one (height, width)")
    return out


def _check_limits(given: dict) -> None:
    """ValueError for a threshold outside [0, 1] or a limit that is not a positive int or None
    (unset values and None thresholds mean the config's)."""
    for field in ("conf_threshold", "nms_threshold"):
        v = given[field]
        if v is None:
            continue
        try:
            ok = 0.0 <= float(v) <= 1.0  # (False for NaN)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{field}: expected a number in [0, 1], got {v!r}")
    for field in ("top_k", "keep_top_k"):
        v = given[field]
        if v is _UNSET or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0:
            raise ValueError(f"{field}: expected a positive int or None, got {v!r}")


def export_stablehlo(
    path: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    backbone: str = "mobilenet0.25",
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    conf_threshold: float | None = None,
    nms_threshold: float | None = None,
    top_k: int | None = _UNSET,  # type: ignore[assignment]
    keep_top_k: int | None = _UNSET,  # type: ignore[assignment]
    model=None,
    cfg: RetinaFaceConfig | None = None,
) -> Path:
    """Write the detection programs for ``sizes`` (``(H, W)`` each) to ``path`` (``.npz``).

    ``weights``: an original ``.pth``/``.tar``, a native checkpoint dir, or None for the official
    ``backbone`` weights (fetched and cached, as ``Detector.from_pretrained``); or pass a loaded
    ``model`` (and its ``cfg``). Thresholds and limits default to the config's, as
    ``Detector.detect`` (0.02, 0.4, 5000, 750); ``top_k``/``keep_top_k`` None = no limit. They
    are baked into the programs and recorded in ``meta``. Returns ``path``.
    """
    platforms = tuple(str(p).lower() for p in platforms)
    if not platforms:
        raise ValueError("platforms: expected at least one of cpu, cuda, rocm, tpu")
    sizes = _check_sizes(sizes)
    given = {
        "conf_threshold": conf_threshold,
        "nms_threshold": nms_threshold,
        "top_k": top_k,
        "keep_top_k": keep_top_k,
    }
    _check_limits(given)  # before loading the weights
    if model is None:
        from retinaface_jax.weights.cache import load_pretrained

        model, cfg = load_pretrained(
            backbone if weights is None else weights, backbone=backbone, progress=False
        )
    cfg = cfg or model.cfg
    model.eval()
    limits = {
        "conf_threshold": float(cfg.conf_threshold if conf_threshold is None else conf_threshold),
        "nms_threshold": float(cfg.nms_threshold if nms_threshold is None else nms_threshold),
        "top_k": cfg.top_k if top_k is _UNSET else top_k,
        "keep_top_k": cfg.keep_top_k if keep_top_k is _UNSET else keep_top_k,
    }
    for field in ("top_k", "keep_top_k"):
        limits[field] = None if limits[field] is None else int(limits[field])
    leaves, rebuild = flat_state(model)
    arrays: dict[str, np.ndarray] = {
        f"weight_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)
    }
    for h, w in sizes:
        program = detection_program(rebuild, cfg, h, w, **limits)
        exported = export_program(program, leaves, h, w, platforms)
        arrays[f"program_{h}x{w}"] = np.frombuffer(bytes(exported.serialize()), dtype=np.uint8)
    meta = {
        "format": FORMAT,
        "backbone": cfg.backbone,
        "platforms": list(platforms),
        "sizes": [list(s) for s in sizes],
        "num_weights": len(leaves),
        "input": "uint8 BGR [H, W, 3]",
        "outputs": "rows [max_keep, 15] float32 (x1, y1, x2, y2, score, 5 x (x, y)), count int32",
        "rgb_mean": list(cfg.rgb_mean),
        **limits,
    }
    arrays["meta"] = np.asarray(json.dumps(meta))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:  # (a file object: np.savez would append ".npz" to a name)
        np.savez(fh, **arrays)
    os.replace(tmp, out)
    return out


def load_programs(path: str | os.PathLike) -> tuple[dict, list[np.ndarray], dict]:
    """``(meta, weights, {(H, W): Exported})`` of a file written by :func:`export_stablehlo`
    (the loader recipe of the module docstring, for every size at once)."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        weights = [f[f"weight_{i}"] for i in range(meta["num_weights"])]
        programs = {
            (h, w): jax.export.deserialize(bytearray(f[f"program_{h}x{w}"].tobytes()))
            for h, w in meta["sizes"]
        }
    return meta, weights, programs
