"""Prior-to-face matching and the RetinaFace MultiBoxLoss with hard negative mining (jnp, batched).

Semantics are the original's ``match`` and ``MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)``
with padded targets: ``targets [B, M, 15]`` (x1, y1, x2, y2 normalised, ten landmark coordinates,
label 1 = face with landmarks / -1 = face without) and ``valid [B, M]`` marking the real rows.
Every operation keeps the batch as the leading axis and works per image (the batch is only summed
at the very end), so the loss partitions over a data-parallel device mesh. Shapes are static and
everything is jit-able. Matching streams over the faces in small chunks (no ``[B, M, P]`` IoU in
memory) and stops after the last real face; a caller can hand that part to another
implementation (``best_overlaps``: the CPU train step passes the native kernel's one pass, same
targets in every case tested; its IoU rounds every operation as the original does, where XLA may
fuse one sum into an FMA). Negatives are mined without sorting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from retinaface_jax.box_utils import encode, encode_landm, jaccard, point_form
from retinaface_jax.config import RetinaFaceConfig, cfg_mnet

__all__ = ["match", "multibox_loss", "MIN_BEST_PRIOR_IOU"]

Array = jax.Array
# (truths [B, M, 4] corners, usable [B, M], priors [P, 4] corners) -> (each face's best prior's
# IoU [B, M] and index [B, M], each prior's best face's IoU [B, P] and index [B, P])
BestOverlaps = Callable[[Array, Array, Array], tuple[Array, Array, Array, Array]]

# The original's ``match`` ignores faces whose best prior overlaps them by less than this
# (hard-coded there, not part of its configuration).
MIN_BEST_PRIOR_IOU = 0.2
# faces per step of the matching loop (a speed knob only: results do not depend on it)
_MATCH_CHUNK = 8


def _check_targets(priors: Array, targets: Array, valid: Array) -> None:
    if priors.ndim != 2 or priors.shape[-1] != 4:
        raise ValueError(f"priors: expected shape [P, 4], got {priors.shape}")
    if targets.ndim != 3 or targets.shape[-1] != 15:
        raise ValueError(f"targets: expected shape [B, M, 15], got {targets.shape}")
    if valid.shape != targets.shape[:2]:
        raise ValueError(
            f"valid: expected shape {targets.shape[:2]} (the [B, M] of targets), got {valid.shape}"
        )


def _best_overlaps(
    truths: Array, usable: Array, prior_points: Array, chunk: int
) -> tuple[Array, Array, Array, Array]:
    """IoU bookkeeping of the original ``match`` without materialising the ``[B, M, P]`` IoU.

    truths ``[B, M, 4]`` point form, usable ``[B, M]``, prior_points ``[P, 4]`` point form.
    Returns the best prior per face (overlap ``[B, M]``, first index ``[B, M]``) and the best
    usable face per prior (overlap ``[B, P]``, first index ``[B, P]``); unusable faces get overlap
    -1 / index 0 and never win a prior (as if their IoU were -1 everywhere).

    Faces are processed ``chunk`` rows at a time in a while loop that stops after the last usable
    row of the batch, so the cost follows the real number of faces rather than the padding (keep
    real rows first). Ties resolve to the first index, like torch's ``max``.
    """
    batch, rows = usable.shape
    num_priors = prior_points.shape[0]
    pad = -rows % chunk
    truths = jnp.pad(truths, ((0, 0), (0, pad), (0, 0)))
    usable = jnp.pad(usable, ((0, 0), (0, pad)))
    last = jnp.max(jnp.where(usable, jnp.arange(rows + pad) + 1, 0))  # over the whole batch
    num_chunks = (last + chunk - 1) // chunk
    prior_iota = jnp.arange(num_priors, dtype=jnp.int32)

    def body(state: tuple[Array, ...]) -> tuple[Array, ...]:
        k, truth_best, truth_idx, prior_best, prior_idx = state
        start = k * chunk
        use = jax.lax.dynamic_slice_in_dim(usable, start, chunk, axis=1)  # [B, C]
        iou = jaccard(jax.lax.dynamic_slice_in_dim(truths, start, chunk, axis=1), prior_points)
        row_best = iou.max(axis=-1)  # [B, C]
        row_idx = jnp.where(iou == row_best[..., None], prior_iota, num_priors).min(axis=-1)
        prior_best = jax.lax.dynamic_update_slice_in_dim(
            prior_best, jnp.where(use, row_best, -1.0), start, axis=1
        )
        prior_idx = jax.lax.dynamic_update_slice_in_dim(
            prior_idx, jnp.where(use, row_idx, 0), start, axis=1
        )
        for c in range(chunk):  # later rows replace only on a strictly larger overlap
            take = use[:, c, None] & (iou[:, c] > truth_best)
            truth_best = jnp.where(take, iou[:, c], truth_best)
            truth_idx = jnp.where(take, start + c, truth_idx)
        return k + 1, truth_best, truth_idx, prior_best, prior_idx

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, num_priors), -1.0, jnp.float32),
        jnp.zeros((batch, num_priors), jnp.int32),
        jnp.full((batch, rows + pad), -1.0, jnp.float32),
        jnp.zeros((batch, rows + pad), jnp.int32),
    )
    _, truth_best, truth_idx, prior_best, prior_idx = jax.lax.while_loop(
        lambda state: state[0] < num_chunks, body, init
    )
    return prior_best[:, :rows], prior_idx[:, :rows], truth_best, truth_idx


def _assign(
    priors: Array,
    truths: Array,
    landms: Array,
    labels: Array,
    usable: Array,
    best_prior_overlap: Array,
    best_prior_idx: Array,
    best_truth_overlap: Array,
    best_truth_idx: Array,
    threshold: float,
    variances: Sequence[float],
    min_best_iou: float,
) -> tuple[Array, Array, Array]:
    """The rest of ``match`` for one image (truths [M,4], landms [M,10], labels [M], usable [M])."""
    keep = usable & (best_prior_overlap >= min_best_iou)  # faces that are not ignored
    # every kept face owns its best prior: overlap forced to 2 (index_fill_ in the original)
    forced = jnp.zeros(best_truth_idx.shape, bool).at[best_prior_idx].max(keep)
    best_truth_overlap = jnp.where(forced, 2.0, best_truth_overlap)
    # the original then loops over ALL faces (ignored ones too): best_truth_idx[best_prior_idx[j]]
    # = j, later j winning duplicates -> a scatter-max of j over the usable rows
    rows = jnp.where(usable, jnp.arange(truths.shape[0], dtype=jnp.int32), -1)
    owner = jnp.full(best_truth_idx.shape, -1, jnp.int32).at[best_prior_idx].max(rows)
    best_truth_idx = jnp.where(owner >= 0, owner, best_truth_idx)

    conf = jnp.where(best_truth_overlap < threshold, 0, labels[best_truth_idx].astype(jnp.int32))
    loc = encode(truths[best_truth_idx], priors, variances)
    landm = encode_landm(landms[best_truth_idx], priors, variances)
    # the original leaves an image whose faces are all ignored entirely background, targets zero
    any_kept = keep.any()
    conf = jnp.where(any_kept, conf, 0)
    loc = jnp.where(any_kept, loc, 0.0)
    landm = jnp.where(any_kept, landm, 0.0)
    return loc, conf, landm


def match(
    priors: Array,
    targets: Array,
    valid: Array,
    threshold: float,
    variances: Sequence[float],
    *,
    min_best_iou: float = MIN_BEST_PRIOR_IOU,
    best_overlaps: BestOverlaps | None = None,
) -> tuple[Array, Array, Array]:
    """Assign each prior a face (or background) and encode its regression targets.

    Args:
      priors: ``[P, 4]`` centre-form priors (``prior_box``).
      targets: ``[B, M, 15]`` padded faces: x1, y1, x2, y2 (normalised), 10 landmark coords, label.
      valid: ``[B, M]`` bool, True for real rows. Rows that are not valid, or whose box has a
        non-positive or non-finite width/height, never match anything.
      threshold: IoU below which a prior is background (``cfg.overlap_threshold``).
      variances: ``cfg.variance``. ``threshold``, ``variances`` and ``min_best_iou`` are static
        Python numbers (the core is jitted once per value and shape).
      min_best_iou: faces whose best prior IoU is below this are ignored (the original's 0.2).
      best_overlaps: what computes each face's best prior and each prior's best face
        (:data:`BestOverlaps`, a module-level function); default: XLA, streaming over chunks
        of faces.

    Returns:
      ``loc_t [B, P, 4]`` float32, ``conf_t [B, P]`` int32 (0 background, else the face's label
      1 / -1), ``landm_t [B, P, 10]`` float32 (meaningful where ``conf_t > 0``).
    """
    priors = jnp.asarray(priors, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    valid = jnp.asarray(valid, bool)
    _check_targets(priors, targets, valid)
    try:
        static = (float(threshold), tuple(float(v) for v in variances), float(min_best_iou))
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "match: threshold, variances and min_best_iou must be Python numbers (static), "
            f"got {threshold!r}, {variances!r}, {min_best_iou!r}"
        ) from e
    if len(static[1]) != 2:
        raise ValueError(f"match: variances must be a pair (cfg.variance), got {variances!r}")
    return _match_batch(priors, targets, valid, *static, best_overlaps or _chunked_overlaps)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _match_batch(
    priors: Array,
    targets: Array,
    valid: Array,
    threshold: float,
    variances: tuple[float, float],
    min_best_iou: float,
    best_overlaps: BestOverlaps,
) -> tuple[Array, Array, Array]:
    truths, landms, labels = targets[..., :4], targets[..., 4:14], targets[..., 14]
    wh = truths[..., 2:] - truths[..., :2]
    usable = valid & jnp.all(jnp.isfinite(truths) & (wh > 0).all(-1)[..., None], axis=-1)
    usable = jax.lax.stop_gradient(usable & jnp.isfinite(labels))
    truths = jax.lax.stop_gradient(truths)  # targets are data; the while loop has no VJP

    best = best_overlaps(truths, usable, point_form(priors))

    def one(*args: Array) -> tuple[Array, Array, Array]:
        return _assign(priors, *args, threshold, variances, min_best_iou)

    return jax.vmap(one)(truths, landms, labels, usable, *best)


def _chunked_overlaps(truths: Array, usable: Array, priors: Array):
    """The default :data:`BestOverlaps`: XLA, streaming over chunks of faces."""
    return _best_overlaps(truths, usable, priors, _MATCH_CHUNK)


def _smooth_l1(x: Array) -> Array:
    """Elementwise smooth L1 (Huber with beta 1), as torch's ``smooth_l1_loss``."""
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def _masked_smooth_l1_sum(pred: Array, target: Array, mask: Array) -> Array:
    """Per-image sum of smooth L1 over the priors in ``mask`` [B, P]: returns [B]."""
    m = mask[..., None]
    # zero the unused targets first so their (possibly inf/NaN) values never reach the gradient
    diff = pred - jnp.where(m, target, 0.0)
    return jnp.where(m, _smooth_l1(diff), 0.0).sum(axis=(1, 2))


def _cross_entropy(logits: Array, target: Array) -> Array:
    """Per-prior softmax cross entropy ``[B, P]`` of ``logits [B, P, C]`` against class ``target``.

    Written per class column (C is 2): XLA vectorises ``[B, P]`` arithmetic far better than a
    reduction over a minor axis of size 2 (faster on CPU than ``log_softmax`` + gather).
    """
    cols = [logits[..., c].astype(jnp.float32) for c in range(logits.shape[-1])]
    top = functools.reduce(jnp.maximum, cols)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    lse = jnp.log(sum(jnp.exp(x - top) for x in cols)) + top
    picked = functools.reduce(
        lambda acc, c: jnp.where(target == c, cols[c], acc), range(1, len(cols)), cols[0]
    )
    return lse - picked


def _kth_largest(values: Array, k: Array) -> Array:
    """Per row of ``values [B, P]`` (all >= 0), the ``k[b]``-th largest value (``1 <= k <= P``).

    Bisection on the float32 bit patterns, which order like the values for non-negative floats:
    31 passes of a compare-and-count over ``[B, P]`` instead of a sort (much faster on CPU), exact.
    """
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    lo = jnp.zeros(values.shape[:-1], jnp.int32)  # count(bits >= lo) = P >= k
    hi = jnp.full(values.shape[:-1], 0x7F800001, jnp.int32)  # above +inf: count = 0 < k

    def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = (bits >= mid[..., None]).sum(axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _hard_negatives(mining_loss: Array, num_neg: Array) -> Array:
    """Mask [B, P] of the ``num_neg[b]`` priors with the largest ``mining_loss`` in each image.

    Static shapes, no sort: everything above the ``num_neg``-th largest value, then as many of the
    priors tied with it as still fit, in index order. Selecting exactly ``num_neg`` matters when
    many priors share a value (e.g. constant logits); which tied prior is picked does not change
    the loss. Values that are not > 0 (including NaN) rank as 0, like the zeroed positives.
    """
    num_priors = mining_loss.shape[-1]
    values = jnp.where(mining_loss > 0, mining_loss, 0.0)
    kth = _kth_largest(values, jnp.clip(num_neg, 1, num_priors))[..., None]
    above = values > kth
    tied = values == kth
    room = num_neg[..., None] - above.sum(axis=-1, keepdims=True)
    neg = above | (tied & (jnp.cumsum(tied, axis=-1) <= room))
    return neg & (num_neg[..., None] > 0)


def multibox_loss(
    predictions: tuple[Array, Array, Array],
    priors: Array,
    targets: Array,
    valid: Array,
    cfg: RetinaFaceConfig | None = None,
    *,
    best_overlaps: BestOverlaps | None = None,
) -> tuple[Array, Array, Array]:
    """The original MultiBoxLoss: ``(loss_l, loss_c, loss_landm)``, float32 scalars.

    ``predictions = (loc [B,P,4], conf [B,P,C] logits, landm [B,P,10])``; ``priors [P,4]``;
    ``targets [B,M,15]`` and ``valid [B,M]`` as in :func:`match`. ``cfg`` supplies
    ``overlap_threshold``, ``variance``, ``neg_pos_ratio`` and ``num_classes`` (default: the
    mobilenet0.25 preset, whose loss settings equal resnet50's); ``best_overlaps`` as in
    :func:`match`.

    - ``loss_l``: smooth L1 (summed) of box offsets on positive priors (matched to any face),
    - ``loss_landm``: smooth L1 (summed) of landmark offsets on priors matched to faces with
      landmarks (label 1),
    - ``loss_c``: cross entropy (summed) over positives (class 1) and, per image, the
      ``min(neg_pos_ratio * num_pos, P - 1)`` negatives with the largest background loss
      (an image with no face at all counts as ``num_pos = 1`` here, so it trains as a pure
      negative; the original crashes on such images),
    ``loss_l`` and ``loss_c`` divided by ``max(total positives, 1)``, ``loss_landm`` by
    ``max(total positives with landmarks, 1)``. Train on ``cfg.loc_weight * loss_l + loss_c +
    loss_landm``.
    """
    cfg = cfg_mnet if cfg is None else cfg
    loc_p, conf_p, landm_p = (jnp.asarray(x) for x in predictions)
    priors = jnp.asarray(priors, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    valid = jnp.asarray(valid, bool)
    _check_targets(priors, targets, valid)
    batch, num_priors = targets.shape[0], priors.shape[0]
    for name, arr, last in (
        ("loc", loc_p, 4),
        ("conf", conf_p, cfg.num_classes),
        ("landm", landm_p, 10),
    ):
        if arr.shape != (batch, num_priors, last):
            raise ValueError(
                f"predictions {name}: expected shape {(batch, num_priors, last)} "
                f"(batch of targets, priors, {last}), got {arr.shape}"
            )

    loc_t, conf_t, landm_t = match(
        priors, targets, valid, cfg.overlap_threshold, cfg.variance, best_overlaps=best_overlaps
    )

    pos_landm = conf_t > 0  # faces with landmarks
    pos = conf_t != 0  # every matched prior
    num_pos = pos.sum(axis=1)  # [B]

    loss_landm = _masked_smooth_l1_sum(landm_p, landm_t, pos_landm)  # [B]
    loss_l = _masked_smooth_l1_sum(loc_p, loc_t, pos)  # [B]

    # per-prior cross entropy with target 1 on positives, 0 (background) elsewhere
    ce = _cross_entropy(conf_p, pos.astype(jnp.int32))  # [B, P]

    # hard negative mining on the background loss, positives excluded (ranked as zero loss)
    mining = jax.lax.stop_gradient(jnp.where(pos, 0.0, ce))
    # An image without any face (the original crashes on those) mines neg_pos_ratio negatives, as
    # if it had one positive, so it trains as a pure negative. Images that have faces keep the
    # original's count, even when every face was too small to match (then 7 * 0 = 0).
    num_pos_for_mining = jnp.where(valid.any(axis=1), num_pos, 1)
    num_neg = jnp.minimum(cfg.neg_pos_ratio * num_pos_for_mining, num_priors - 1)
    neg = _hard_negatives(mining, num_neg)
    loss_c = jnp.where(pos | neg, ce, 0.0).sum(axis=1)  # [B]

    n = jnp.maximum(num_pos.sum(), 1).astype(jnp.float32)
    n1 = jnp.maximum(pos_landm.sum(), 1).astype(jnp.float32)
    return loss_l.sum() / n, loss_c.sum() / n, loss_landm.sum() / n1
