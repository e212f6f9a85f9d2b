"""Detection post-processing: decode + score filter + top-k (jitted, static shapes) and exact NMS.

The original detect.py pipeline is: decode every prior, keep ``score > conf_threshold``, sort by
score and keep ``top_k``, greedy NMS (``py_cpu_nms``, IoU with the ``+1`` pixel area convention,
suppress ``IoU > nms_threshold``), keep ``keep_top_k``. :func:`select_candidates` runs the first
three steps inside a jitted program on padded, masked arrays, and :func:`nms_rows` the greedy
step, in the same program, with the original's float32 arithmetic, so the kept set and its order
are the original's (equal scores keep ``top_k``'s order, lower prior index first; the original
orders ties by numpy's unstable ``argsort``). The NMS runs in the jitted program because it is
much faster there than as host-side numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from retinaface_jax.box_utils import decode, decode_landm
from retinaface_jax.config import RetinaFaceConfig
from retinaface_jax.priors import prior_box


@functools.lru_cache(maxsize=32)
def pixel_priors(cfg: RetinaFaceConfig, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Priors of a ``height x width`` input in pixels ``[P, 4]`` and each prior's stride ``[P]``.

    Pixel priors do not depend on the image size (centre ``(j + 0.5) * step``, size ``min_size``),
    so a padded input's priors restricted to the valid cells equal the unpadded input's. Without
    ``clip`` they lie on the half-pixel grid, so the float32 round trip through the normalised
    ``prior_box`` is snapped back to exact values.
    """
    pri = prior_box(cfg, (height, width)).astype(np.float64)
    pri = pri * np.array([width, height, width, height], dtype=np.float64)
    if not cfg.clip:
        pri = np.round(pri * 2.0) / 2.0
    strides = np.concatenate(
        [
            np.full(-(-height // s) * -(-width // s) * len(m), s, dtype=np.float32)
            for m, s in zip(cfg.min_sizes, cfg.steps, strict=True)
        ]
    )
    pri = pri.astype(np.float32)
    pri.flags.writeable = False
    strides.flags.writeable = False
    return pri, strides


def prior_valid_mask(priors_px: jax.Array, strides: jax.Array, valid_hw: jax.Array) -> jax.Array:
    """``[B, P]``: prior cells that exist for each image's unpadded ``(h, w)`` (``valid_hw [B, 2]``).

    A cell at row ``i`` of a level with stride ``s`` exists iff ``i < ceil(h / s)``, i.e. iff its
    top edge ``cy - s/2 = i * s`` is inside the image (same for columns).
    """
    top = priors_px[None, :, 1] - strides[None, :] / 2
    left = priors_px[None, :, 0] - strides[None, :] / 2
    h = valid_hw[:, 0:1].astype(jnp.float32)
    w = valid_hw[:, 1:2].astype(jnp.float32)
    return (top < h) & (left < w)


def select_candidates(
    loc: jax.Array,
    conf_logits: jax.Array,
    landms: jax.Array,
    priors_px: jax.Array,
    valid: jax.Array,
    resize: jax.Array,
    conf_threshold: jax.Array,
    variances: tuple[float, float],
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode, filter ``score > conf_threshold`` and keep the ``k`` best per image (jit-friendly).

    Returns ``scores [B, k]`` (``-inf`` where no candidate), ``boxes [B, k, 4]`` and
    ``landms [B, k, 10]`` in input pixels (divided by ``resize [B]``), sorted by score descending.
    """
    top, idx = jax.lax.top_k(candidate_scores(conf_logits, valid, conf_threshold), k)
    take = jax.vmap(lambda a, i: a[i])
    boxes, lm = _decoded(take(loc, idx), take(landms, idx), priors_px[idx], resize, variances)
    return top, boxes, lm


def candidate_scores(conf_logits: jax.Array, valid: jax.Array, threshold: jax.Array) -> jax.Array:
    """Face probability where valid and above ``threshold``, else ``-inf`` (no candidate)."""
    scores = jax.nn.softmax(conf_logits, axis=-1)[..., 1]
    return jnp.where(valid & (scores > threshold), scores, -jnp.inf)


def _decoded(loc, landms, priors, resize, variances):
    """Boxes and landmarks in input pixels (divided by ``resize [B]``)."""
    scale = resize[:, None, None]
    return decode(loc, priors, variances) / scale, decode_landm(landms, priors, variances) / scale


def detections_native(
    loc: jax.Array,
    conf_logits: jax.Array,
    landms: jax.Array,
    priors_px: jax.Array,
    valid: jax.Array,
    resize: jax.Array,
    conf_threshold: jax.Array,
    variances: tuple[float, float],
    k: int,
    nms_threshold: jax.Array,
    max_keep: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`select_candidates` then :func:`nms_rows`, with top-k and NMS in one native CPU
    kernel (``backends.native.ops.topk_nms``; needs ``native_kernels_available()``): the same candidates,
    order and NMS decisions (tested index for index); decoded coordinates may differ from the
    XLA path's in the last bit, as XLA compiles the decode of every prior and of the top ``k``
    as different loops.

    Every prior's box is decoded (elementwise, as the XLA path does for its top ``k``); the kernel
    orders the candidates, keeps the ``k`` best and runs the NMS; the kept rows are gathered and
    only their landmarks decoded (decoding every prior's would be wasted work). The kernel
    replaces XLA's ``top_k`` (a sort of every prior) and NMS loop, which are slow on CPU.
    """
    from retinaface_jax.backends.native import ops

    masked = candidate_scores(conf_logits, valid, conf_threshold)
    scale = resize[:, None, None]
    boxes = decode(loc, priors_px, variances) / scale
    keep, count = ops.topk_nms(masked, boxes, nms_threshold, k, max_keep)
    lm = decode_landm(_take_kept(landms, keep), priors_px[jnp.maximum(keep, 0)], variances) / scale
    kept = [_take_kept(boxes, keep), _take_kept(masked[..., None], keep), lm]
    return jnp.concatenate(kept, axis=-1), count


def greedy_nms(
    scores: jax.Array, boxes: jax.Array, threshold: jax.Array, max_keep: int
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS of one image's candidates, sorted by score descending (``-inf`` = no candidate).

    ``scores [K]``, ``boxes [K, 4]`` -> ``(keep [max_keep] int32, count)``: kept row indices in
    output order, ``-1`` after ``count``. The original ``py_cpu_nms`` arithmetic in float32:
    areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``, a box survives only if ``IoU <= threshold`` against
    every earlier kept box (a NaN IoU suppresses, as ``ovr <= thresh`` does in numpy). One loop
    step per kept box, each a few fused vector operations over ``K``; XLA's CPU backend emits
    these without contracting into FMAs and divides exactly, so the decisions are numpy's.
    """
    x1, y1, x2, y2 = (boxes[:, c] for c in range(4))
    one = jnp.float32(1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    position = jnp.arange(scores.shape[0])

    def cond(carry):
        _, _, count, i = carry
        return (count < max_keep) & (i >= 0)

    def body(carry):
        active, keep, count, i = carry
        w = jnp.maximum(0.0, jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1) + one)
        h = jnp.maximum(0.0, jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1) + one)
        inter = w * h
        ovr = inter / (areas[i] + areas - inter)
        active = active & (position > i) & (ovr <= threshold)
        nxt = jnp.argmax(active)
        return active, keep.at[count].set(i), count + 1, jnp.where(active[nxt], nxt, -1)

    active = jnp.isfinite(scores)
    first = jnp.where(active[0], 0, -1).astype(jnp.int32)
    keep = jnp.full((max_keep,), -1, jnp.int32)
    _, keep, count, _ = jax.lax.while_loop(cond, body, (active, keep, jnp.int32(0), first))
    return keep, count


def _prefix_sizes(k: int) -> list[int]:
    """Static candidate-prefix lengths NMS may run on: ``k`` and 2048, 16384, ... below ``k / 2``.

    Each length is one more compiled loop (more XLA compile time), so they
    are few: two for the default ``top_k`` of 5000.
    """
    sizes, s = [], 2048
    while 2 * s <= k:
        sizes.append(s)
        s *= 8
    return sizes + [k]


def nms_rows(
    scores: jax.Array,
    boxes: jax.Array,
    landms: jax.Array,
    threshold: jax.Array,
    max_keep: int,
) -> tuple[jax.Array, jax.Array]:
    """Batched :func:`greedy_nms` on sorted candidates -> the original's detection rows.

    ``scores [B, K]`` (``-inf`` where none), ``boxes [B, K, 4]``, ``landms [B, K, 10]`` ->
    ``(rows [B, max_keep, 15], count [B])`` with rows ``[x1, y1, x2, y2, score, landmarks]`` in
    output order (rows past ``count`` are filler). Candidates are a prefix (sorted, ``-inf``
    last), so the loop runs on the shortest static prefix (:func:`_prefix_sizes`) holding every
    image's candidates: its cost per kept box scales with that length, not with ``K``.
    """
    k = scores.shape[1]
    sizes = _prefix_sizes(k)

    def run_on_prefix(n: int):
        def one_image(args):
            return greedy_nms(*args, threshold, min(max_keep, n))

        def run(scores, boxes):
            # one image after another: a vmapped loop would run every image for as many steps as
            # the one with the most kept faces (detect_batch on 120 val images, batch 8: 17.5
            # images/s vmapped, 19.9 this way; same detections)
            keep, count = jax.lax.map(one_image, (scores[:, :n], boxes[:, :n]))
            pad = max_keep - keep.shape[1]
            return jnp.pad(keep, ((0, 0), (0, pad)), constant_values=-1), count

        return run

    if len(sizes) == 1:
        keep, count = run_on_prefix(k)(scores, boxes)
    else:
        longest = jnp.max(jnp.sum(jnp.isfinite(scores), axis=1))
        branch = jnp.sum(jnp.asarray(sizes[:-1]) < longest)
        keep, count = jax.lax.switch(branch, [run_on_prefix(n) for n in sizes], scores, boxes)
    return _gather_rows(scores, boxes, landms, keep), count


def _take_kept(a: jax.Array, keep: jax.Array) -> jax.Array:
    """``a [B, P, C]`` at the kept indices ``keep [B, K]`` (-1, no detection: row 0, which the
    caller cuts by the count)."""
    return jnp.take_along_axis(a, jnp.maximum(keep, 0)[..., None], axis=1)


def _gather_rows(scores, boxes, landms, keep):
    """Detection rows ``[x1, y1, x2, y2, score, landmarks]`` of the kept candidates."""
    return _take_kept(jnp.concatenate([boxes, scores[..., None], landms], axis=-1), keep)
