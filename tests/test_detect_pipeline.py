"""Detection plumbing: NMS, priors, decode/top-k, bucket padding, batching (stand-in + real model)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_detect_helpers import FakeRetinaFace, fake_detector, reference_postprocess, softmax

from retinaface_jax.config import get_config
from retinaface_jax.inference import buckets
from retinaface_jax.inference.detector import Detector
from retinaface_jax.inference.postprocess import greedy_nms, nms_rows, pixel_priors
from retinaface_jax.inference.preprocess import resize_factor, to_network_input
from retinaface_jax.priors import prior_box

CFG = get_config("mobilenet0.25")


def _random_dets(rng, n):
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(2, 60, (n, 2))
    scores = np.sort(rng.uniform(0, 1, n))[::-1]
    return np.concatenate([xy, xy + wh, scores[:, None]], 1).astype(np.float32)


def _py_cpu_nms(dets, thresh):
    """The original greedy NMS, restated independently for the test."""
    x1, y1, x2, y2, s = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = s.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        o = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[o]) - np.maximum(x1[i], x1[o]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[o]) - np.maximum(y1[i], y1[o]) + 1)
        inter = w * h
        order = o[inter / (areas[i] + areas[o] - inter) <= thresh]
    return np.array(keep, dtype=np.int64)


def _kept(dets, thr, max_keep=None, pad_to=512):
    """Indices kept by the jitted ``greedy_nms`` for sorted ``dets`` padded with -inf rows."""
    n = len(dets)
    scores = np.full(pad_to, -np.inf, np.float32)
    boxes = np.zeros((pad_to, 4), np.float32)
    scores[:n], boxes[:n] = dets[:, 4], dets[:, :4]
    keep, count = jax.jit(greedy_nms, static_argnums=3)(
        scores, boxes, np.float32(thr), max_keep or pad_to
    )
    return np.asarray(keep)[: int(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_original_greedy(seed):
    rng = np.random.default_rng(seed)
    dets = _random_dets(rng, 400)
    dets[::7, 2] = dets[::7, 0] - 3  # some inverted boxes (negative areas), handled as numpy does
    dets[5::11, :4] = dets[4::11, :4][: len(dets[5::11])]  # exact duplicates: IoU exactly 1
    for thr in (0.3, 0.4, 0.7, 1.0):
        np.testing.assert_array_equal(_kept(dets, thr), _py_cpu_nms(dets, thr))
    np.testing.assert_array_equal(_kept(dets, 0.4, max_keep=5), _py_cpu_nms(dets, 0.4)[:5])


def test_nms_plus_one_area_convention():
    # two 10x10 boxes (pixels 0..9) shifted by 5: with +1 areas IoU = 50/150 = 1/3
    dets = np.array([[0, 0, 9, 9, 0.9], [5, 0, 14, 9, 0.8]], np.float32)
    assert _kept(dets, 0.34).tolist() == [0, 1]
    assert _kept(dets, 0.33).tolist() == [0]
    assert _kept(np.zeros((0, 5), np.float32), 0.4).tolist() == []


@pytest.mark.parametrize("k,max_keep", [(5000, 750), (5000, 5000), (600, 600)])
def test_nms_rows_batched_on_every_prefix_length(k, max_keep):
    """Images whose candidate counts need different prefix branches, in one batch and alone."""
    rng = np.random.default_rng(3)
    counts = [c for c in (0, 37, 300, 1500, 2048, 2049, 4999) if c <= k]
    scores = np.full((len(counts), k), -np.inf, np.float32)
    boxes = rng.uniform(0, 50, (len(counts), k, 4)).astype(np.float32)
    landms = rng.uniform(0, 300, (len(counts), k, 10)).astype(np.float32)
    refs = []
    for j, n in enumerate(counts):
        d = _random_dets(rng, n)
        scores[j, :n], boxes[j, :n] = d[:, 4], d[:, :4]
        keep = _py_cpu_nms(d, 0.4)[:max_keep]
        refs.append(np.concatenate([d[keep], landms[j, keep]], axis=1))
    run = jax.jit(nms_rows, static_argnums=4)
    for idx in (list(range(len(counts))), [1], [len(counts) - 1]):
        rows, count = run(scores[idx], boxes[idx], landms[idx], np.float32(0.4), max_keep)
        for r, c, j in zip(np.asarray(rows), np.asarray(count), idx, strict=True):
            np.testing.assert_array_equal(r[:c], refs[j])


@pytest.mark.parametrize("hw", [(640, 640), (481, 643), (33, 47), (1080, 1920)])
def test_pixel_priors_match_prior_box(hw):
    h, w = hw
    px, strides = pixel_priors(CFG, h, w)
    ref = prior_box(CFG, hw).astype(np.float64) * [w, h, w, h]
    np.testing.assert_allclose(px, ref, atol=1e-3)
    assert strides.shape == (px.shape[0],) and set(np.unique(strides)) == set(CFG.steps)


def _reference_on_fake(x, resize, **thresholds):
    """The original pipeline (test oracle) on the stand-in model's raw outputs for input ``x``."""
    loc, conf, landm = FakeRetinaFace()(x[None])
    loc, conf, landm = np.asarray(loc)[0], softmax(conf)[0], np.asarray(landm)[0]
    priors = prior_box(CFG, x.shape[:2])
    return reference_postprocess(
        loc, conf, landm, priors, CFG, resize, x.shape[0], x.shape[1], **thresholds
    )


@pytest.mark.parametrize(
    "hw,options",
    [
        ((97, 131), {}),
        ((200, 150), {"target_size": 320, "max_size": 400}),
        ((64, 90), {"max_size": 150}),
    ],
)
def test_fake_detector_equals_reference_pipeline(hw, options):
    rng = np.random.default_rng(hw[0])
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    det = fake_detector(**options)
    resize = resize_factor(*hw, options.get("target_size"), options.get("max_size"))
    x = to_network_input(img, resize, CFG.rgb_mean)
    ref = _reference_on_fake(x, resize, conf=0.3, nms_thr=0.4, top_k=50, keep_top_k=20)
    got = np.stack([f.to_row() for f in det.detect(img, 0.3, 0.4, top_k=50, keep_top_k=20)])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got[:, 4], ref[:, 4], atol=1e-6)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_no_limits_mean_all_candidates():
    img = np.random.default_rng(5).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    det = fake_detector()
    x = to_network_input(img, 1.0, CFG.rgb_mean)
    ref = _reference_on_fake(x, 1.0, conf=0.02, nms_thr=0.9, top_k=None, keep_top_k=None)
    got = det.detect(img, nms_threshold=0.9, top_k=None, keep_top_k=None)
    assert len(got) == len(ref) > 750 // 4
    assert len(det.detect(img, nms_threshold=0.9, top_k=10, keep_top_k=None)) <= 10
    assert len(det.detect(img, nms_threshold=0.9, top_k=None, keep_top_k=3)) == 3


def test_results_are_sorted_and_in_input_pixels():
    img = np.random.default_rng(7).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    faces = fake_detector(target_size=300, max_size=1000).detect(img)
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    boxes = np.stack([f.box for f in faces])
    # decoded boxes are centred on priors inside the resized image, mapped back to input pixels
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert centres[:, 0].max() < 100 + 16 and centres[:, 1].max() < 150 + 16


def test_batch_of_mixed_sizes_equals_single_images():
    rng = np.random.default_rng(3)
    imgs = [
        rng.integers(0, 256, s, dtype=np.uint8)
        for s in [(97, 131, 3), (60, 60, 3), (97, 131, 3), (130, 70, 3)]
    ]
    det = fake_detector(batch_size=2)
    batched = det.detect_batch(imgs)
    for img, faces in zip(imgs, batched, strict=True):
        single = det.detect(img)
        assert len(single) == len(faces)
        for a, b in zip(single, faces, strict=True):
            np.testing.assert_array_equal(a.to_row(), b.to_row())


def test_buckets_rule():
    for s in [1, 31, 32, 33, 300, 480, 511, 513, 640, 1025, 2049, 5000]:
        b = buckets.bucket_side(s)
        assert b >= s and b % 32 == 0
        assert b - s < max(32, b / 8)
    sides = {buckets.bucket_side(s) for s in range(513, 1025)}
    assert len(sides) == 8
    assert buckets.bucket_shape(481, 643, exact=True) == (481, 643)
    assert [buckets.bucket_batch(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def _real_random_model():
    from flax import nnx

    from retinaface_jax.models.retinaface import RetinaFace

    model = RetinaFace("mobilenet0.25", rngs=nnx.Rngs(1))
    # non-trivial BatchNorm statistics so a padded region would leak into border cells
    rng = np.random.default_rng(0)
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "var") and hasattr(m, "mean"):
            m.mean[...] = rng.normal(0, 0.5, m.mean[...].shape).astype(np.float32)
            m.bias[...] = rng.normal(0, 0.5, m.bias[...].shape).astype(np.float32)
    model.eval()
    return model


@pytest.mark.parametrize("hw", [(97, 131), (64, 64)])
def test_padding_never_changes_results_real_model(hw):
    model = _real_random_model()
    padded = Detector(model, compilation_cache=False)
    exact = Detector(model, compilation_cache=False, exact_sizes=True)
    img = np.random.default_rng(hw[1]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    if hw == (64, 64):  # a size that is already a bucket: pad it inside a larger batch instead
        other = np.zeros((40, 50, 3), np.uint8)
        got = padded.detect_batch([img, other], top_k=None, keep_top_k=None)[0]
    else:
        assert padded.bucket_of(*hw) != hw
        got = padded.detect(img, top_k=None, keep_top_k=None)
    ref = exact.detect(img, top_k=None, keep_top_k=None)
    assert len(ref) > 0 and len(got) == len(ref)
    got, ref = np.stack([f.to_row() for f in got]), np.stack([f.to_row() for f in ref])
    # Same detections in the same order. The masked padded forward is bit-identical to the
    # unpadded one under JAX's default single-CPU-device setup; with the 4 simulated devices of
    # conftest.py XLA's CPU kernels partition work by shape and round differently in the last bit,
    # so allow a few float32 ulps here.
    np.testing.assert_allclose(got[:, 4], ref[:, 4], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)


def test_padding_unmasked_would_differ():
    """Sanity: the masking matters (a zero-padded but unmasked run is not identical)."""
    import jax.numpy as jnp

    model = _real_random_model()
    x = np.random.default_rng(0).normal(0, 40, (1, 97, 131, 3)).astype(np.float32)
    xp = np.zeros((1, 128, 160, 3), np.float32)
    xp[:, :97, :131] = x
    ref = np.asarray(model(jnp.asarray(x))[1])[0]
    from retinaface_jax.inference.postprocess import prior_valid_mask

    px, st = pixel_priors(CFG, 128, 160)
    valid = np.asarray(prior_valid_mask(jnp.asarray(px), jnp.asarray(st), jnp.array([[97, 131]])))[
        0
    ]
    unmasked = np.asarray(model(jnp.asarray(xp))[1])[0][valid]
    assert unmasked.shape == ref.shape
    assert np.abs(unmasked - ref).max() > 1e-4


def test_mixed_folder_compiles_few_programs():
    rng = np.random.default_rng(4)
    sizes = [(100, 130), (97, 100), (110, 128), (120, 100), (100, 130), (105, 125), (100, 100)]
    imgs = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
    det = fake_detector(batch_size=4)
    buckets_used = {det.bucket_of(*s) for s in sizes}
    assert buckets_used == {(128, 160), (128, 128)}  # 6 distinct sizes, two buckets
    det.detect_batch(imgs)
    # per bucket: one program for full batches and one for single images at most
    assert det._program._cache_size() <= 2 * len(buckets_used)


@pytest.mark.parametrize(
    "field, value",
    [
        ("conf_threshold", float("nan")),
        ("conf_threshold", -0.1),
        ("conf_threshold", "high"),
        ("nms_threshold", 1.5),
        ("nms_threshold", float("inf")),
        ("nms_threshold", float("nan")),
    ],
)
def test_thresholds_must_be_finite_and_in_range(field, value):
    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=f"{field}: expected a number in \\[0, 1\\]"):
        fake_detector().detect(img, **{field: value})
