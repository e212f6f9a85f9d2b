"""match and multibox_loss: golden values of the original, edge cases, jit/grad, data mesh."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from retinaface_jax.box_utils import encode, jaccard, point_form
from retinaface_jax.config import cfg_mnet
from retinaface_jax.loss import _best_overlaps, match, multibox_loss
from retinaface_jax.priors import prior_box

SEEDS = (0, 1, 2)
LOSS_KEYS = ("loss_l", "loss_c", "loss_landm")


def _case(golden, seed: int) -> dict[str, np.ndarray]:
    return golden(f"loss_case_seed{seed}")


def _match(priors, targets, valid):
    return match(priors, targets, valid, cfg_mnet.overlap_threshold, cfg_mnet.variance)


_jit_loss = jax.jit(lambda preds, priors, t, v: multibox_loss(preds, priors, t, v, cfg_mnet))


def _face(x1, y1, x2, y2, label=1.0) -> np.ndarray:
    """One target row; landmarks spread inside the box."""
    xs = np.linspace(x1, x2, 7)[1:6]
    ys = np.linspace(y1, y2, 7)[1:6]
    return np.array([x1, y1, x2, y2, *np.stack([xs, ys], 1).ravel(), label], np.float32)


def _random_preds(rng, b: int, p: int):
    return (
        rng.normal(size=(b, p, 4)).astype(np.float32),
        rng.normal(size=(b, p, 2)).astype(np.float32),
        rng.normal(size=(b, p, 10)).astype(np.float32),
    )


def _reference_loss(preds, loc_t, conf_t, landm_t, neg_pos: int):
    """The original's loss from given match outputs, in numpy with its double-argsort ranking."""
    loc, conf, landm = (np.asarray(x, np.float64) for x in preds)
    loc_t, landm_t, conf_t = np.asarray(loc_t), np.asarray(landm_t), np.asarray(conf_t)

    def sl1(d):
        a = np.abs(d)
        return np.where(a < 1, 0.5 * d * d, a - 0.5)

    pos1, pos = conf_t > 0, conf_t != 0
    loss_landm = sl1(landm[pos1] - landm_t[pos1]).sum()
    loss_l = sl1(loc[pos] - loc_t[pos]).sum()
    lse = np.log(np.exp(conf).sum(-1))
    target = pos.astype(int)
    ce = lse - np.take_along_axis(conf, target[..., None], -1)[..., 0]
    mining = np.where(pos, 0.0, ce)
    rank = np.argsort(np.argsort(-mining, axis=1, kind="stable"), axis=1, kind="stable")
    num_pos = pos.sum(1, keepdims=True)
    neg = rank < np.minimum(neg_pos * num_pos, conf.shape[1] - 1)
    loss_c = ce[pos | neg].sum()
    n, n1 = max(pos.sum(), 1), max(pos1.sum(), 1)
    return loss_l / n, loss_c / n, loss_landm / n1


# ---------------------------------------------------------------- golden values of the original


@pytest.mark.parametrize("seed", SEEDS)
def test_match_equals_golden(golden, seed):
    g = _case(golden, seed)
    loc_t, conf_t, landm_t = (
        np.asarray(x) for x in _match(g["priors"], g["targets"], g["target_valid"])
    )
    np.testing.assert_array_equal(conf_t, g["match_conf_t"])
    assert (conf_t > 0).any() and (conf_t < 0).any(), "case should hold both kinds of faces"
    np.testing.assert_allclose(loc_t, g["match_loc_t"], rtol=1e-5, atol=1e-5)
    lm = g["match_conf_t"] > 0
    np.testing.assert_allclose(landm_t[lm], g["match_landm_t"][lm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_loss_equals_golden(golden, seed):
    g = _case(golden, seed)
    preds = (g["loc"], g["conf"], g["landm"])
    got = _jit_loss(preds, g["priors"], g["targets"], g["target_valid"])
    for key, value in zip(LOSS_KEYS, got, strict=True):
        assert value.shape == () and value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), float(g[key]), rtol=1e-5, err_msg=key)


def test_golden_priors_are_ours(golden):
    """The loss cases use the real priors of their image size."""
    for seed in SEEDS:
        g = _case(golden, seed)
        size = int(g["image_size"])
        np.testing.assert_allclose(prior_box(cfg_mnet, (size, size)), g["priors"], atol=1e-6)


def test_loss_matches_numpy_reference_with_ties(golden):
    """Mining against an independent argsort reference, with many tied background losses."""
    g = _case(golden, 1)
    rng = np.random.default_rng(0)
    b, p = g["conf"].shape[:2]
    loc, conf, landm = _random_preds(rng, b, p)
    conf[:, ::3] = conf[:, :1]  # a third of the priors share one pair of logits per image
    conf = np.round(conf, 1)  # and the rest take few distinct values
    loc_t, conf_t, landm_t = _match(g["priors"], g["targets"], g["target_valid"])
    expected = _reference_loss((loc, conf, landm), loc_t, conf_t, landm_t, cfg_mnet.neg_pos_ratio)
    got = _jit_loss((loc, conf, landm), g["priors"], g["targets"], g["target_valid"])
    np.testing.assert_allclose([float(x) for x in got], expected, rtol=1e-5)


# ---------------------------------------------------------------- matching semantics


def _small_setup(size: int = 64):
    priors = prior_box(cfg_mnet, (size, size))
    return priors, np.asarray(point_form(priors))


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_best_overlaps_loop_equals_dense_argmax(chunk):
    """The chunked while loop against a dense numpy IoU matrix with first-index argmax."""
    priors, pf = _small_setup()
    rng = np.random.default_rng(chunk)
    b, m = 3, 11
    xy = rng.uniform(0, 0.8, (b, m, 2))
    truths = np.concatenate([xy, xy + rng.uniform(0.01, 0.4, (b, m, 2))], -1).astype(np.float32)
    truths[0, 4] = truths[0, 2]  # exact duplicate: ties resolve to the first row
    usable = rng.uniform(size=(b, m)) < 0.7
    usable[1] = False  # an image without faces
    usable[2, -1] = True  # the last row is real: the loop must reach it
    got = [
        np.asarray(x) for x in jax.jit(_best_overlaps, static_argnums=3)(truths, usable, pf, chunk)
    ]
    iou = np.where(usable[..., None], np.asarray(jaccard(truths, pf)), -1.0)
    np.testing.assert_array_equal(got[0], iou.max(2))
    np.testing.assert_array_equal(got[1], iou.argmax(2))
    np.testing.assert_array_equal(got[2], iou.max(1))
    np.testing.assert_array_equal(got[3], iou.argmax(1))


def test_duplicate_faces_later_row_owns_the_best_prior():
    priors, _ = _small_setup()
    face = _face(0.2, 0.2, 0.45, 0.45)
    targets = np.stack([face, face])[None]
    targets[0, 1, 14] = -1.0  # same box, the later row has no landmarks
    valid = np.ones((1, 2), bool)
    best = int(np.argmax(np.asarray(jaccard(face[None, :4], point_form(priors)))[0]))
    _, conf_t, _ = _match(priors, targets, valid)
    conf_t = np.asarray(conf_t)[0]
    assert conf_t[best] == -1
    # elsewhere the first row wins ties (argmax), like the original
    others = np.flatnonzero(conf_t != 0)
    assert len(others) > 1 and (conf_t[others[others != best]] == 1).all()


def test_every_kept_face_gets_its_best_prior_even_below_threshold():
    priors, pf = _small_setup()
    # a thin 6x30 px face: best IoU 96 / 340 with a 16 px anchor, between 0.2 and 0.35
    face = _face(25 / 64, 13 / 64, 31 / 64, 43 / 64)
    ious = np.asarray(jaccard(face[None, :4], pf))[0]
    assert 0.2 <= ious.max() < cfg_mnet.overlap_threshold
    loc_t, conf_t, _ = _match(priors, face[None, None], np.ones((1, 1), bool))
    conf_t = np.asarray(conf_t)[0]
    assert np.flatnonzero(conf_t).tolist() == [int(ious.argmax())]


def test_ignored_face_still_claims_its_best_prior_like_the_original():
    """The original's loop assigns every face (ignored ones too) to its best prior; that prior is
    then positive with the ignored face's label when another face overlaps it enough."""
    priors, pf = _small_setup()
    big = _face(4 / 64, 4 / 64, 28 / 64, 28 / 64, 1.0)
    tiny = _face(13 / 64, 13 / 64, 15 / 64, 15 / 64, -1.0)  # inside big, best IoU 4/256
    iou_big = np.asarray(jaccard(big[None, :4], pf))[0]
    iou_tiny = np.asarray(jaccard(tiny[None, :4], pf))[0]
    claimed = int(iou_tiny.argmax())
    assert iou_tiny.max() < 0.2 and iou_big[claimed] >= cfg_mnet.overlap_threshold
    assert claimed != int(iou_big.argmax())
    loc_t, conf_t, _ = _match(priors, np.stack([big, tiny])[None], np.ones((1, 2), bool))
    assert int(conf_t[0, claimed]) == -1
    expected = encode(tiny[None, :4], priors[claimed], cfg_mnet.variance)[0]
    np.testing.assert_allclose(loc_t[0, claimed], expected, rtol=1e-6)


def test_image_with_only_ignored_faces_is_all_background():
    priors, pf = _small_setup()
    tiny = _face(0.5, 0.5, 0.5 + 1.5 / 64, 0.5 + 1.5 / 64)
    assert np.asarray(jaccard(tiny[None, :4], pf)).max() < 0.2
    loc_t, conf_t, landm_t = _match(priors, tiny[None, None], np.ones((1, 1), bool))
    assert not np.asarray(conf_t).any()
    assert not np.asarray(loc_t).any() and not np.asarray(landm_t).any()


def test_padded_rows_never_match():
    priors, _ = _small_setup()
    real = np.stack([_face(0.1, 0.1, 0.4, 0.4), _face(0.5, 0.5, 0.9, 0.8, -1.0)])[None]
    junk = np.stack([_face(0.1, 0.1, 0.4, 0.4, -1.0), _face(0.55, 0.1, 0.95, 0.45)])[None]
    padded = np.concatenate([junk[:, :1], real, junk[:, 1:]], axis=1)
    valid = np.array([[False, True, True, False]])
    for a, b in zip(
        _match(priors, real, np.ones((1, 2), bool)), _match(priors, padded, valid), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_match_per_image_equals_batched():
    priors, _ = _small_setup()
    t = np.stack(
        [
            np.stack([_face(0.1, 0.1, 0.4, 0.4), _face(0.5, 0.5, 0.9, 0.8, -1.0)]),
            np.stack([_face(0.2, 0.3, 0.6, 0.9), _face(0.0, 0.0, 0.1, 0.1)]),
        ]
    )
    valid = np.array([[True, True], [True, False]])
    batched = [np.asarray(x) for x in _match(priors, t, valid)]
    for i in range(2):
        single = _match(priors, t[i : i + 1], valid[i : i + 1])
        np.testing.assert_array_equal(batched[1][i], np.asarray(single[1])[0])
        for a, b in zip(batched, single, strict=True):
            np.testing.assert_allclose(a[i], np.asarray(b)[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- loss edge cases


def _loss_and_grad(preds, priors, targets, valid):
    def total(p):
        l, c, lm = multibox_loss(p, priors, targets, valid, cfg_mnet)
        return cfg_mnet.loc_weight * l + c + lm, (l, c, lm)

    (value, parts), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(preds)
    return float(value), [float(x) for x in parts], grads


def test_no_faces_trains_as_pure_negatives():
    """An image without faces mines neg_pos_ratio hard negatives (as if it had one positive)."""
    priors, _ = _small_setup()
    rng = np.random.default_rng(0)
    preds = _random_preds(rng, 2, len(priors))
    targets = np.zeros((2, 3, 15), np.float32)
    value, parts, grads = _loss_and_grad(preds, priors, targets, np.zeros((2, 3), bool))
    conf = np.asarray(preds[1], np.float64)
    background_ce = np.log(np.exp(conf).sum(-1)) - conf[..., 0]  # [B, P]
    k = cfg_mnet.neg_pos_ratio
    expected = np.sort(background_ce, axis=1)[:, ::-1][:, :k].sum()  # N = max(0 positives, 1)
    assert parts[0] == 0.0 and parts[2] == 0.0
    np.testing.assert_allclose(parts[1], expected, rtol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    assert float(jnp.abs(grads[1]).sum()) > 0


def test_degenerate_boxes_are_finite_and_ignored():
    priors, _ = _small_setup()
    rng = np.random.default_rng(1)
    preds = _random_preds(rng, 1, len(priors))
    good = _face(0.1, 0.1, 0.5, 0.6)
    bad = np.stack(
        [
            _face(0.2, 0.2, 0.2, 0.5),  # zero width
            _face(0.3, 0.3, 0.5, 0.3),  # zero height
            _face(0.6, 0.6, 0.4, 0.9),  # inverted
            _face(0.0, 0.0, 0.0, 0.0),  # a point at the corner
            np.where(np.arange(15) == 2, np.nan, _face(0.1, 0.1, 0.5, 0.6)),  # NaN coordinate
            np.where(np.arange(15) == 3, np.inf, _face(0.1, 0.1, 0.5, 0.6)),  # inf coordinate
        ]
    ).astype(np.float32)
    targets = np.concatenate([good[None], bad])[None]
    value, parts, grads = _loss_and_grad(preds, priors, targets, np.ones((1, 7), bool))
    assert math.isfinite(value)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    only_good = _loss_and_grad(preds, priors, good[None, None], np.ones((1, 1), bool))
    np.testing.assert_allclose(parts, only_good[1], rtol=1e-6)


def test_golden_case_grads_are_finite_and_nonzero(golden):
    g = _case(golden, 2)
    preds = (g["loc"], g["conf"], g["landm"])
    value, parts, grads = _loss_and_grad(preds, g["priors"], g["targets"], g["target_valid"])
    expected = cfg_mnet.loc_weight * g["loss_l"] + g["loss_c"] + g["loss_landm"]
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for grad in grads:
        assert bool(jnp.isfinite(grad).all()) and bool((grad != 0).any())


def test_constant_logits_mine_exactly_num_neg():
    """All background losses tie: exactly min(7 * num_pos, P - 1) negatives are counted."""
    priors, _ = _small_setup(64)
    p = len(priors)
    grid = [
        _face(x / 4 + 0.01, y / 4 + 0.01, x / 4 + 0.24, y / 4 + 0.24)
        for x in range(4)
        for y in range(4)
    ]
    targets = np.stack([np.stack(grid), np.stack(grid[:1] * 16)])
    valid = np.ones((2, 16), bool)
    valid[1, 1:] = False  # one face: few positives, unclamped
    _, conf_t, _ = _match(priors, targets, valid)
    num_pos = (np.asarray(conf_t) != 0).sum(1)
    assert num_pos.min() >= 1 and 7 * num_pos.max() > p - 1, "want one clamped image"
    zeros = (np.zeros((2, p, 4), np.float32), np.zeros((2, p, 2), np.float32))
    preds = (zeros[0], zeros[1], np.zeros((2, p, 10), np.float32))
    _, loss_c, _ = _jit_loss(preds, priors, targets, valid)
    # every counted prior costs log 2; pos | neg = num_pos + min(7 num_pos, P - 1), capped at P
    counted = np.minimum(num_pos + np.minimum(7 * num_pos, p - 1), p).sum()
    np.testing.assert_allclose(float(loss_c), counted * math.log(2) / num_pos.sum(), rtol=1e-6)


def test_shape_errors_are_clear():
    priors, _ = _small_setup()
    p = len(priors)
    preds = _random_preds(np.random.default_rng(0), 1, p)
    targets = _face(0.1, 0.1, 0.4, 0.4)[None, None]
    valid = np.ones((1, 1), bool)
    with pytest.raises(ValueError, match="targets"):
        multibox_loss(preds, priors, targets[..., :14], valid)
    with pytest.raises(ValueError, match="valid"):
        multibox_loss(preds, priors, targets, np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="predictions conf"):
        multibox_loss((preds[0], preds[1][..., :1], preds[2]), priors, targets, valid)
    with pytest.raises(ValueError, match="priors"):
        match(priors[:, :3], targets, valid, 0.35, cfg_mnet.variance)


def test_partitions_over_a_data_mesh(golden):
    g = _case(golden, 0)
    devices = np.array(jax.devices()[:4])
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) devices")
    batch = NamedSharding(Mesh(devices, ("data",)), PS("data"))
    args = [jax.device_put(x, batch) for x in (g["loc"], g["conf"], g["landm"], g["targets"])]
    valid = jax.device_put(g["target_valid"], batch)
    got = _jit_loss(tuple(args[:3]), g["priors"], args[3], valid)
    for key, value in zip(LOSS_KEYS, got, strict=True):
        np.testing.assert_allclose(float(value), float(g[key]), rtol=1e-5, err_msg=key)
