"""The whole detection program as ``jax.export`` StableHLO, for serving with plain JAX.

A program: uint8 BGR image ``[H, W, 3]`` -> mean subtraction
(``models.mean_subtraction.subtract_mean``) -> the reference model ``RetinaFace`` called as
``model(x)`` (eval mode; never the native CPU kernels) -> decode with the priors of ``H x W`` ->
score filter -> top-k -> greedy NMS with the original's arithmetic (``inference.postprocess``)
-> ``(rows [max_keep, 15] float32, count int32)``, rows ``[x1, y1, x2, y2, score, 10 landmark
coordinates]`` in input pixels, highest score first, valid up to ``count``.

By default one shape-polymorphic program (``sizes=None``: symbolic ``H, W``, priors computed in
the program) for images of any size; ``sizes`` exports one program per exact input size instead
(no faster: the same time per call was measured for both). Never a padded size bucket: on an
input padded to a bucket the plain model is not the unpadded model near the padded border (only
``backends.planned_forward`` masks it).

The file is one ``.npz`` (readable with numpy alone): ``meta`` (JSON), the model's weights
``weight_0 .. weight_{n-1}`` (the first argument of every program, so stored once for all
sizes) and ``program_{H}x{W}`` (or ``program_any``): serialized ``jax.export.Exported`` bytes,
lowered for every requested platform. Loader recipe (no ``retinaface_jax`` needed)::

    import json, jax, numpy as np
    from jax import export

    f = np.load("retinaface.npz")
    meta = json.loads(str(f["meta"]))
    weights = [f[f"weight_{i}"] for i in range(meta["num_weights"])]
    h, w = image.shape[:2]  # image: uint8 BGR [H, W, 3]
    key = f"program_{h}x{w}" if meta["sizes"] is not None else "program_any"
    program = export.deserialize(bytearray(f[key].tobytes()))
    rows, count = program.call(weights, image)
    faces = np.asarray(rows)[: int(count)]  # [x1, y1, x2, y2, score, landmarks...]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.errors import InconclusiveDimensionOperation

from retinaface_jax.config import RetinaFaceConfig
from retinaface_jax.inference.postprocess import (
    nms_rows,
    pixel_priors,
    select_candidates,
)
from retinaface_jax.models.flat_state import flat_state
from retinaface_jax.models.mean_subtraction import subtract_mean

if TYPE_CHECKING:
    from flax import nnx

__all__ = [
    "DEFAULT_PLATFORMS",
    "DEFAULT_SIZES",
    "FORMAT",
    "detection_program",
    "export_program",
    "export_stablehlo",
    "load_programs",
    "symbolic_priors",
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


def symbolic_priors(cfg: RetinaFaceConfig, height, width) -> tuple[jax.Array, jax.Array]:
    """``pixel_priors`` in jnp, for ``height``/``width`` that may be symbolic dimensions.

    Without ``clip`` a pixel prior is exactly ``((j + 0.5) * step, (i + 0.5) * step, s, s)``
    (``pixel_priors`` snaps to that half-pixel grid), which float32 holds exactly.
    """
    if cfg.clip:
        raise ValueError("symbolic sizes: priors with clip=True depend on the size; use sizes")
    priors, strides = [], []
    for sizes, step in zip(cfg.min_sizes, cfg.steps, strict=True):
        rows, cols, a = (height + step - 1) // step, (width + step - 1) // step, len(sizes)
        cx = (jnp.arange(cols, dtype=jnp.float32) + 0.5) * step
        cy = (jnp.arange(rows, dtype=jnp.float32) + 0.5) * step
        sk = jnp.asarray(sizes, jnp.float32)
        grid = jnp.stack(
            [
                jnp.broadcast_to(cx[None, :, None], (rows, cols, a)),
                jnp.broadcast_to(cy[:, None, None], (rows, cols, a)),
                jnp.broadcast_to(sk, (rows, cols, a)),
                jnp.broadcast_to(sk, (rows, cols, a)),
            ],
            axis=-1,
        )
        priors.append(grid.reshape(rows * cols * a, 4))
        strides.append(jnp.full((rows * cols * a,), step, jnp.float32))
    return jnp.concatenate(priors), jnp.concatenate(strides)


def detection_program(
    rebuild: Callable[[Sequence[jax.Array]], Callable],
    cfg: RetinaFaceConfig,
    height,
    width,
    *,
    conf_threshold: float,
    nms_threshold: float,
    top_k: int | None,
    keep_top_k: int | None,
) -> Callable[[Sequence[jax.Array], jax.Array], tuple[jax.Array, jax.Array]]:
    """``f(weights, image [height, width, 3] uint8 BGR) -> (rows [max_keep, 15], count)``.

    ``rebuild(weights)`` gives the model (``flat_state``). The priors are computed in the program
    (:func:`symbolic_priors`, equal to ``pixel_priors``). For int sizes ``k`` and ``max_keep``
    are those ``Detector.dispatch`` uses for an input of this size (``None`` = no limit). For
    symbolic sizes (``jax.export.symbolic_shape``) ``k = top_k`` is static: the candidates are
    padded with ``k`` non-candidates so ``top_k`` never exceeds their number; ``max_keep =
    keep_top_k`` (rows past ``count`` are filler either way), and ``top_k`` cannot be None.
    """
    symbolic = not all(isinstance(s, int | np.integer) for s in (height, width))
    if symbolic:
        if top_k is None:
            raise ValueError("top_k=None (no limit) needs fixed sizes: k would be symbolic")
        k = int(top_k)
    else:
        num_priors = len(pixel_priors(cfg, int(height), int(width))[1])
        k = num_priors if top_k is None else min(int(top_k), num_priors)
    max_keep = k if keep_top_k is None else min(int(keep_top_k), k)
    variances = tuple(cfg.variance)

    def program(weights: Sequence[jax.Array], image: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = rebuild(weights)
        x = subtract_mean(image[None], cfg.rgb_mean)
        loc, conf, landms = model(x)
        if cfg.clip:  # (as constants: a large part of the file at large sizes)
            priors = jnp.asarray(pixel_priors(cfg, int(height), int(width))[0])
        else:  # computed in the program
            priors, _ = symbolic_priors(cfg, height, width)
        # the program runs at the exact size: every prior is valid
        valid = jnp.ones(loc.shape[:2], bool)
        if symbolic:  # k padded rows, never valid, so that top_k's k never exceeds the rows
            pad = ((0, 0), (0, k), (0, 0))
            loc, conf, landms = (jnp.pad(a, pad) for a in (loc, conf, landms))
            priors = jnp.pad(priors, ((0, k), (0, 0)))
            valid = jnp.pad(valid, ((0, 0), (0, k)))
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
    height,
    width,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
    """``program`` (from :func:`detection_program`) lowered for ``platforms``.

    Symbolic sizes need a model that computes nothing in numpy from its input shape (the
    reference builds its index tables in ``jnp``); a model that does raises a ValueError saying so.
    """
    specs = [jax.ShapeDtypeStruct(np.shape(w), w.dtype) for w in weights]
    image = jax.ShapeDtypeStruct((height, width, 3), jnp.uint8)
    try:
        return jax.export.export(jax.jit(program), platforms=list(platforms))(specs, image)
    except InconclusiveDimensionOperation as e:
        raise ValueError(
            "symbolic sizes: the model needs a concrete input shape here; export fixed sizes "
            f"instead ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from e


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
    sizes: Sequence[tuple[int, int]] | None = None,
    conf_threshold: float | None = None,
    nms_threshold: float | None = None,
    top_k: int | None = _UNSET,  # type: ignore[assignment]
    keep_top_k: int | None = _UNSET,  # type: ignore[assignment]
    model: nnx.Module | None = None,
    cfg: RetinaFaceConfig | None = None,
) -> Path:
    """Write the detection programs for ``sizes`` (``(H, W)`` each; None: one program for any
    size, see the module docstring) to ``path`` (``.npz``) and return ``path``.

    ``weights``: an original ``.pth``/``.tar``, a native checkpoint dir, or None for the official
    ``backbone`` weights (fetched and cached, as ``Detector.from_pretrained``); or pass a loaded
    ``model`` (and its ``cfg``). Thresholds and limits default to the config's, as
    ``Detector.detect`` (0.02, 0.4, 5000, 750); ``top_k``/``keep_top_k`` None = no limit. They
    are baked into the programs and recorded in ``meta``.
    """
    platforms = tuple(str(p).lower() for p in platforms)
    if not platforms:
        raise ValueError("platforms: expected at least one of cpu, cuda, rocm, tpu")
    sizes = None if sizes is None else _check_sizes(sizes)
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
    shapes = {"program_any": jax.export.symbolic_shape("h, w")} if sizes is None else {}
    shapes.update({f"program_{h}x{w}": (h, w) for h, w in sizes or ()})
    for key, (h, w) in shapes.items():
        program = detection_program(rebuild, cfg, h, w, **limits)
        exported = export_program(program, leaves, h, w, platforms)
        arrays[key] = np.frombuffer(bytes(exported.serialize()), dtype=np.uint8)
    meta = {
        "format": FORMAT,
        "backbone": cfg.backbone,
        "platforms": list(platforms),
        "sizes": None if sizes is None else [list(s) for s in sizes],
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
    """``(meta, weights, programs)`` of a file written by :func:`export_stablehlo` (the loader
    recipe of the module docstring, for every program at once): ``programs`` maps ``(H, W)``,
    or ``None`` for the program of any size, to its ``jax.export.Exported``."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        weights = [f[f"weight_{i}"] for i in range(meta["num_weights"])]
        keys = {None: "program_any"} if meta["sizes"] is None else {}
        keys.update({(h, w): f"program_{h}x{w}" for h, w in meta["sizes"] or ()})
        programs = {
            size: jax.export.deserialize(bytearray(f[key].tobytes())) for size, key in keys.items()
        }
    return meta, weights, programs
