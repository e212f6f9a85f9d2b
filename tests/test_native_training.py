"""The native depthwise kernels of the train step (``backends.native.native_training``): values and both
gradients against ``lax.conv``, batch-parallel under a 4-device mesh, and used by the CPU train
step only (inference and non-float32 steps keep XLA)."""

from __future__ import annotations

import contextlib
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from program_inputs import empty_batch

from retinaface_jax.backends import train_layers
from retinaface_jax.backends.native import build as native
from retinaface_jax.backends.native import native_training, ops
from retinaface_jax.backends.native.native_training import depthwise_applies, native_gradients
from retinaface_jax.backends.xla_cpu import conv_ops
from retinaface_jax.train.sharding import make_mesh


@pytest.fixture(scope="module", autouse=True)
def kernels_required():
    switch = os.environ.get(native.ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        pytest.skip(f"native CPU kernels disabled by {native.ENV_SWITCH}={switch}")
    assert native.native_kernels_available(), "the native CPU kernels did not build or register"


def reference(x, k, stride):
    return lax.conv_general_dilated(
        x,
        k,
        (stride, stride),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST,
    )


# (batch, h, w, channels, stride): 8/16-lane channel counts, 8-lane remainders (24, 40), odd and
# one-pixel sizes (every pixel an edge), widths below the interior fast path
CASES = [
    (2, 9, 11, 8, 1),
    (2, 10, 12, 16, 2),
    (1, 7, 5, 24, 2),
    (3, 1, 1, 8, 1),
    (2, 2, 3, 32, 2),
    (1, 13, 11, 40, 1),
    (2, 6, 2, 48, 1),
    (1, 5, 8, 8, 2),
]


@pytest.mark.parametrize(
    "n, h, w, c, s", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-s{c[4]}" for c in CASES]
)
def test_depthwise_and_its_gradients_match_lax(n, h, w, c, s):
    rng = np.random.default_rng([n, h, w, c, s])
    x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    k = rng.normal(size=(3, 3, 1, c)).astype(np.float32)
    y = jax.jit(lambda x, k: ops.depthwise(x, k, s))(x, k)
    ref, vjp = jax.vjp(lambda x, k: reference(x, k, s), x, k)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=ref.shape).astype(np.float32)
    dx, dk = jax.jit(lambda x, k, g: ops.depthwise_grad(x, k, g, s))(x, k, dy)
    dx_ref, dk_ref = vjp(dy)
    assert dx.shape == x.shape and dk.shape == (n, 3, 3, 1, c)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk.sum(0), dk_ref, rtol=1e-5, atol=1e-4)
    # per image: each image's kernel gradient on its own
    dk0 = vjp(np.concatenate([dy[:1], np.zeros_like(dy[1:])]))[1]
    np.testing.assert_allclose(dk[0], dk0, rtol=1e-5, atol=1e-4)


def test_depthwise_rejects_what_it_cannot_run():
    x = np.zeros((1, 5, 5, 12), np.float32)
    with pytest.raises(ValueError, match=r"C a multiple of 8.*got x \(1, 5, 5, 12\)"):
        ops.depthwise(x, np.zeros((3, 3, 1, 12), np.float32), 1)
    x = np.zeros((1, 5, 5, 8), np.float32)
    with pytest.raises(ValueError, match="kernel"):
        ops.depthwise(x, np.zeros((5, 5, 1, 8), np.float32), 1)
    with pytest.raises(ValueError, match="stride"):
        ops.depthwise(x, np.zeros((3, 3, 1, 8), np.float32), 3)
    with pytest.raises(ValueError, match=r"dy \(1, 4, 4, 8\), expected \(1, 5, 5, 8\)"):
        ops.depthwise_grad(x, np.zeros((3, 3, 1, 8), np.float32), np.zeros((1, 4, 4, 8)), 1)


def loss_and_grads(stride, mesh=None, native=True):
    """Jitted ``(x, k) -> (sum(sin(depthwise(x, k))), gradients)`` through ``conv_ops.conv2d``."""

    def loss(x, k):
        return jnp.sum(jnp.sin(conv_ops.conv2d(x, k, stride, 1, x.shape[-1])))

    def f(x, k):
        with native_gradients(mesh) if native else contextlib.nullcontext():
            return jax.value_and_grad(loss, argnums=(0, 1))(x, k)

    return jax.jit(f)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_takes_the_kernels_only_inside_native_gradients(stride):
    rng = np.random.default_rng(stride)
    x = rng.normal(size=(4, 17, 20, 16)).astype(np.float32)
    k = rng.normal(size=(3, 3, 1, 16)).astype(np.float32)
    native_fn = loss_and_grads(stride)
    xla_fn = loss_and_grads(stride, native=False)
    assert "retinaface_depthwise_grad" in native_fn.lower(x, k).as_text()
    assert "retinaface_depthwise" not in xla_fn.lower(x, k).as_text()
    (v1, (dx1, dk1)), (v2, (dx2, dk2)) = native_fn(x, k), xla_fn(x, k)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk1, dk2, rtol=1e-5, atol=1e-4)
    # not float32, 5x5, padding 0, or channels not a multiple of 8: XLA's formulation
    with native_gradients():
        assert depthwise_applies(x, k, stride, 1)
        assert not depthwise_applies(x, k, stride, 0)
        assert not depthwise_applies(x, np.zeros((5, 5, 1, 16), np.float32), stride, 1)
        assert not depthwise_applies(x[..., :12], k[..., :12], stride, 1)
        with jax.enable_x64(True):
            x64 = jnp.asarray(x, jnp.float64)
            assert not depthwise_applies(x64, jnp.asarray(k, jnp.float64), stride, 1)
    assert not depthwise_applies(x, k, stride, 1)  # outside the block


@pytest.mark.parametrize("stride", [1, 2])
def test_batch_parallel_on_four_devices(stride):
    """Under a 4-device ``('data',)`` mesh each device runs the kernels on its images (the HLO
    holds per-device calls of a quarter of the batch) and the values and gradients equal the
    one-device ones."""
    mesh = make_mesh(jax.devices()[:4])
    rng = np.random.default_rng(10 + stride)
    x = rng.normal(size=(8, 15, 12, 24)).astype(np.float32)
    k = rng.normal(size=(3, 3, 1, 24)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ks = jax.device_put(k, NamedSharding(mesh, P()))
    sharded = loss_and_grads(stride, mesh)
    single = loss_and_grads(stride)
    hlo = sharded.lower(xs, ks).compile().as_text()
    assert "retinaface_depthwise_grad" in hlo and "f32[2,15,12,24]" in hlo, "not per device"
    (v4, (dx4, dk4)), (v1, (dx1, dk1)) = sharded(xs, ks), single(x, k)
    assert dx4.sharding.spec == P("data")
    np.testing.assert_allclose(v4, v1, rtol=1e-5)
    np.testing.assert_allclose(dx4, dx1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk4, dk1, rtol=1e-5, atol=1e-4)


def stats_producers(text: str) -> list[str]:
    """The kernel calls of a lowered program that give their output's moments (a second result
    ``[N, 2, CO]`` rather than an empty one)."""
    forward = "conv|conv_u8|conv_winograd|depthwise|depthwise_bn|conv_bn"
    pattern = rf"custom_call @retinaface_({forward})\(.*-> \(tensor<[^>]*>, tensor<(\w+)>\)"
    return [name for name, moments in re.findall(pattern, text) if moments != "0xf32"]


def test_cpu_train_step_uses_the_kernels(monkeypatch):
    """The CPU train step runs its depthwise layers, 3x3 stride-1 dense layers and BatchNorm sums
    natively; with the kernels unavailable it runs XLA's formulation."""
    import optax
    from flax import nnx

    from retinaface_jax.config import get_config
    from retinaface_jax.models.retinaface import RetinaFace
    from retinaface_jax.train import step as step_module
    from retinaface_jax.train.state import create_train_state

    cfg = get_config("mobilenet0.25")
    tx = optax.sgd(1e-3)
    graphdef, state = create_train_state(RetinaFace(cfg, rngs=nnx.Rngs(0)), tx)
    size = 64
    batch = empty_batch(2, size, dtype=np.uint8)  # as the pipeline gives them

    def hlo(batch=batch):
        step = step_module.make_train_step(graphdef, cfg, size, tx, donate=False)
        return step.lower(state, batch).as_text()

    from retinaface_jax.models.layers import BatchNorm2d, Conv2d

    model = nnx.merge(graphdef, state.params, state.batch_stats)
    dense = [
        m
        for _, m in nnx.iter_modules(model)
        if isinstance(m, Conv2d) and m.groups == 1 and m.kernel_size == 3 and m.stride == 1
    ]
    assert len(dense) == 17  # the FPN merges and five per SSH
    batch_norms = sum(
        isinstance(m, BatchNorm2d)
        for _, m in nnx.iter_modules(nnx.merge(graphdef, state.params, state.batch_stats))
    )
    text = hlo()
    # MobileNetV1's 13 depthwise layers: the 11 after a BatchNorm of the same stage read it
    # through (depthwise_bn), the first of stages 2 and 3 read the stage input; its 13 pointwise
    # layers all read their depthwise layer's BatchNorm through (conv_bn)
    assert text.count("@retinaface_depthwise_bn_grad(") == 11
    assert text.count("@retinaface_depthwise_grad(") == 2
    assert text.count("@retinaface_conv_bn(") == text.count("@retinaface_conv_bn_grad(") == 13
    # every BatchNorm's statistics come from the kernel that writes its input, row by row
    assert text.count("@retinaface_moments(") == 0
    assert len(stats_producers(text)) == batch_norms > 13
    # backward sums: by the 24 read-through gradients, the other BatchNorms' by bn_grad_sums
    assert text.count("@retinaface_bn_grad_sums(") == batch_norms - 24
    assert text.count("@retinaface_conv_winograd(") == 2 * len(dense)  # forward, input gradient
    # the stem reads the uint8 image itself (forward and kernel gradient): no float32 copy
    assert text.count("@retinaface_conv_u8(") == text.count("@retinaface_weight_grad_u8(") == 1
    assert text.count("@retinaface_match_overlaps(") == 1  # matching: one pass, no while loop
    floats = hlo(empty_batch(2, size))
    assert "@retinaface_conv_u8(" not in floats and "@retinaface_weight_grad_u8(" not in floats
    monkeypatch.setattr(step_module, "native_kernels_available", lambda: False)
    assert "@retinaface_" not in hlo()


def test_stem_kernels_read_the_uint8_image_like_float32_minus_the_mean():
    """The stem's forward (with moments) and kernel gradient (with and without the statistics'
    part) on the uint8 image give the float32 kernels' results on the image minus the mean, bit
    for bit, borders included (odd sizes)."""
    rng = np.random.default_rng(11)
    u8 = rng.integers(0, 256, (2, 37, 45, 3)).astype(np.uint8)
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    kernel = rng.normal(size=(3, 3, 3, 16)).astype(np.float32)
    params, layer = ops.plain_layer(jnp.asarray(kernel), stride=2, padding=1)
    with_mean = jnp.concatenate([params, jnp.asarray(mean)])
    y, m = ops.conv(u8.astype(np.float32) - mean, params, layer, moments=True)
    y8, m8 = ops.conv(u8, with_mean, layer, params.shape[0], moments=True)
    np.testing.assert_array_equal(y8, y)
    np.testing.assert_array_equal(m8, m)
    dy = rng.normal(size=y.shape).astype(np.float32)
    for stats in (
        None,
        ops.StatsCotangent(y, jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)),
    ):
        want = ops.weight_grad(u8.astype(np.float32) - mean, dy, 3, 2, 1, stats)
        np.testing.assert_array_equal(ops.weight_grad(u8, dy, 3, 2, 1, stats, mean), want)


def test_uint8_images_step_like_float32_minus_the_mean():
    """The stem's kernels reading the uint8 image (mean subtracted as rows are converted) give
    the step of the float32 image minus the mean bit for bit: loss, parameters, statistics."""
    import optax
    from flax import nnx

    from retinaface_jax.config import get_config
    from retinaface_jax.models.retinaface import RetinaFace
    from retinaface_jax.train.state import create_train_state
    from retinaface_jax.train.step import make_train_step

    cfg = get_config("mobilenet0.25")
    tx = optax.sgd(1e-3, momentum=0.9)
    graphdef, state = create_train_state(RetinaFace(cfg, rngs=nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, cfg, 64, tx, donate=False)
    batch = empty_batch(2, 64)
    batch["targets"][:, 0] = [0.2, 0.3, 0.6, 0.7, *np.linspace(0.25, 0.65, 10), 1.0]
    batch["valid"][:, 0] = True
    u8 = np.random.default_rng(5).integers(0, 256, batch["image"].shape, dtype=np.uint8)
    minus_mean = u8.astype(np.float32) - np.asarray(cfg.rgb_mean, np.float32)
    assert "@retinaface_conv_u8(" in step.lower(state, dict(batch, image=u8)).as_text()
    (s_u8, m_u8), (s_f, m_f) = (step(state, dict(batch, image=x)) for x in (u8, minus_mean))
    assert float(m_u8["loss"]) == float(m_f["loss"]) and np.isfinite(float(m_f["loss"]))
    for a, b in zip(jax.tree.leaves(s_u8), jax.tree.leaves(s_f), strict=True):
        np.testing.assert_array_equal(a, b)


# -- BatchNorm ----------------------------------------------------------------------------------

BN_SHAPES = [(2, 7, 9, 8), (3, 1, 1, 16), (2, 5, 3, 24), (4, 12, 10, 64), (1, 33, 2, 128)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=["x".join(map(str, s)) for s in BN_SHAPES])
def test_moments_and_grad_sums_match_float64(shape):
    """Per image means and M2, the batch statistics combined from them, and the backward sums, on
    values with a large common offset (a sum-of-squares formula would cancel catastrophically
    there)."""
    rng = np.random.default_rng(list(shape))
    x = (rng.normal(size=shape) * 3 + 1000).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    x64 = x.astype(np.float64)
    mean_n, m2_n = jax.jit(ops.moments)(x)
    mean_ref = x64.mean((1, 2))
    m2_ref = ((x64 - mean_ref[:, None, None]) ** 2).sum((1, 2))
    np.testing.assert_allclose(mean_n, mean_ref, rtol=1e-6)
    np.testing.assert_allclose(m2_n, m2_ref, rtol=2e-5, atol=1e-3)
    mean, var = native_training.stats_from_images(mean_n, m2_n, shape[1] * shape[2])
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=2e-5, atol=1e-7)
    center = x64.mean((0, 1, 2)).astype(np.float32)
    sum_g, sum_gx = jax.jit(ops.bn_grad_sums)(g, x, center)
    np.testing.assert_allclose(sum_g, g.astype(np.float64).sum((1, 2)), rtol=1e-5, atol=1e-4)
    ref = (g * (x64 - center)).sum((1, 2))
    np.testing.assert_allclose(sum_gx, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("slope", [0.1, 0.0], ids=["leaky", "relu"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=["x".join(map(str, s)) for s in BN_SHAPES])
def test_grad_sums_through_the_activation_match_float64(shape, slope):
    """With an activation, ``dy`` is masked by ``x * scale + shift > 0`` inside the kernel."""
    rng = np.random.default_rng([*shape, int(slope * 10)])
    c = shape[-1]
    scale = rng.uniform(0.5, 2, c).astype(np.float32)
    shift = rng.normal(size=c).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    near_zero = np.abs(x * scale + shift) < 1e-3  # keep the mask away from rounding at 0
    x[near_zero] += 0.01
    dy = rng.normal(size=shape).astype(np.float32)
    center = x.mean((0, 1, 2), dtype=np.float64).astype(np.float32)
    x64 = x.astype(np.float64)
    g = np.where(x64 * scale + shift > 0, dy, slope * dy.astype(np.float64))
    assert (g != dy).any() and (g == dy).any()
    sums = jax.jit(ops.bn_grad_sums, static_argnums=5)(dy, x, center, scale, shift, slope)
    np.testing.assert_allclose(sums[0], g.sum((1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sums[1], (g * (x64 - center)).sum((1, 2)), rtol=1e-5, atol=1e-4)


def producer_cases():
    """``(name, fn(moments) -> kernel results)`` for every kernel that writes a BatchNorm's input
    in the train step: direct (stride 2 and the narrow stem), Winograd and 1x1 convolutions, the
    plain and read-through depthwise layers and the read-through 1x1 layer; odd sizes, 8- and
    16-lane channel counts."""
    rng = np.random.default_rng(11)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def dense(x, kernel, stride, padding):
        params, layer = ops.plain_layer(kernel, stride=stride, padding=padding)
        return lambda moments: ops.conv(x, params, layer, moments=moments)

    x24, x3, x40 = normal(2, 9, 11, 24), normal(2, 13, 10, 3), normal(3, 5, 7, 40)
    dw, scale, shift = normal(3, 3, 1, 24), normal(24) * 0.5 + 1, normal(24)
    pointwise, layer = ops.plain_layer(normal(1, 1, 24, 40), stride=1, padding=0)
    return [
        ("direct 3x3 stride 2", dense(x24, normal(3, 3, 24, 16), 2, 1)),
        ("narrow stem", dense(x3, normal(3, 3, 3, 8), 2, 1)),
        ("winograd", dense(x40, normal(3, 3, 40, 24), 1, 1)),
        ("1x1", dense(x40, normal(1, 1, 40, 32), 1, 0)),
        ("depthwise", lambda m: ops.depthwise(x24, dw, 2, moments=m)),
        ("depthwise_bn", lambda m: ops.depthwise_bn(x24, dw, scale, shift, 0.1, 1, moments=m)),
        ("conv_bn", lambda m: ops.conv_bn(x24, pointwise, layer, scale, shift, 0.0, moments=m)),
    ]


@pytest.mark.parametrize(
    "name, run", producer_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_layer_kernels_give_their_outputs_moments(name, run):
    """A kernel asked for its output's moments writes the same output and exactly the moments
    ``ops.moments`` finds in it (the same row arithmetic, on each row while it is in cache)."""
    y, moments = jax.jit(lambda: run(True))()
    np.testing.assert_array_equal(y, jax.jit(lambda: run(False))())
    assert moments.shape == (y.shape[0], 2, y.shape[3])
    mean_n, m2_n = jax.jit(ops.moments)(y)
    np.testing.assert_array_equal(moments[:, 0], mean_n)
    np.testing.assert_array_equal(moments[:, 1], m2_n)


def test_moments_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"moments: expected x \[N, H, W, C\].*\(2, 3, 4, 12\)"):
        ops.moments(np.zeros((2, 3, 4, 12), np.float32))
    x, k = np.zeros((1, 4, 4, 8), np.float32), np.zeros((3, 3, 1, 8), np.float32)
    wrong = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((1, 2, 16), jnp.float32),
    )
    call = jax.ffi.ffi_call(ops.DEPTHWISE_TARGET, wrong)
    with pytest.raises(Exception, match=r"retinaface_depthwise: expected moments \[N, 2, CO\]"):
        jax.block_until_ready(call(x, k, stride=np.int64(1)))
    with pytest.raises(ValueError, match=r"bn_grad_sums: dy \(1, 2, 2, 8\).*x \(1, 2, 3, 8\)"):
        ops.bn_grad_sums(np.zeros((1, 2, 2, 8)), np.zeros((1, 2, 3, 8)), np.zeros(8))
    with pytest.raises(ValueError, match="needs scale and shift"):
        ops.bn_grad_sums(np.zeros((1, 2, 2, 8)), np.zeros((1, 2, 2, 8)), np.zeros(8), slope=0.1)


def bn_loss_and_grads(mesh=None, native=True, slope=0.1):
    """Jitted ``(x, scale, bias) -> (loss, grads)`` of a BatchNorm + LeakyReLU in train mode."""
    from retinaface_jax.backends.train_layers import batch_norm_train

    def loss(x, scale, bias):
        z, mean, var = batch_norm_train(x, scale, bias, 1e-5, slope)
        return jnp.sum(jnp.sin(z)) + jnp.sum(mean) + jnp.sum(var)  # statistics' cotangents too

    def f(x, scale, bias):
        with native_gradients(mesh) if native else contextlib.nullcontext():
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    return jax.jit(f)


@pytest.mark.parametrize("slope", [1.0, 0.1, 0.0], ids=["none", "leaky", "relu"])
def test_batch_norm_train_matches_xla_on_one_and_four_devices(slope):
    mesh = make_mesh(jax.devices()[:4])
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(8, 11, 13, 24)) * 2 + 5).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 24).astype(np.float32)
    bias = rng.normal(size=24).astype(np.float32)
    xla = bn_loss_and_grads(native=False, slope=slope)
    one = bn_loss_and_grads(slope=slope)
    four = bn_loss_and_grads(mesh, slope=slope)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    assert "@retinaface_bn_grad_sums(" in one.lower(x, scale, bias).as_text()
    assert "@retinaface_moments(" not in xla.lower(x, scale, bias).as_text()
    compiled = four.lower(xs, scale, bias).compile().as_text()
    assert "retinaface_moments" in compiled and "f32[2,11,13,24]" in compiled, "not per device"
    (v0, g0), (v1, g1), (v4, g4) = xla(x, scale, bias), one(x, scale, bias), four(xs, scale, bias)
    for v, g in ((v1, g1), (v4, g4)):
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        for a, b in zip(g, g0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def bn_conv_loss_and_grads(conv_args, slope, mesh=None, native=True):
    """Jitted ``(x, scale, bias, kernel) -> (loss, grads)`` of BatchNorm -> LeakyReLU -> the
    ``Conv2d(*conv_args)`` -> BatchNorm: read through (``train_layers.batch_norm_into_conv``) inside
    ``native_gradients``, the second BatchNorm's statistics from the convolution's kernel; else
    the layers by XLA."""
    from retinaface_jax.models.layers import BatchNorm2d, Conv2d

    def loss(x, scale, bias, kernel):
        norm, conv = BatchNorm2d(x.shape[-1]), Conv2d(*conv_args, bias=False, rngs=nnx.Rngs(0))
        norm.scale[...], norm.bias[...], conv.kernel[...] = scale, bias, kernel
        after = BatchNorm2d(conv_args[1])
        y, stats = train_layers.batch_norm_into_conv(norm, x, slope, conv)
        assert (stats is None) == (not native)
        z = jnp.sum(jnp.sin(train_layers.batch_norm(after, y, 0.1, stats)))
        running = (norm.mean, norm.var, after.mean, after.var)  # running statistics too
        return z + sum(jnp.sum(v[...]) for v in running)

    def f(*args):
        with native_gradients(mesh) if native else contextlib.nullcontext():
            return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)

    return jax.jit(f)


# (Conv2d arguments: in, out, kernel size, stride, padding, groups), the kernels, slope, input
# height and width (fewer rows than ops.ROW_BLOCKS: fewer row blocks; 2 rows at stride 2: one)
INTO_CONV_CASES = [
    ((24, 24, 3, 1, 1, 24), "depthwise_bn", 0.1, (11, 13)),
    ((24, 24, 3, 2, 1, 24), "depthwise_bn", 0.0, (11, 13)),
    ((24, 24, 3, 1, 1, 24), "depthwise_bn", 1.0, (11, 13)),
    ((24, 24, 3, 2, 1, 24), "depthwise_bn", 0.1, (2, 9)),
    ((24, 40, 1, 1, 0, 1), "conv_bn", 0.1, (11, 13)),
    ((24, 16, 1, 1, 0, 1), "conv_bn", 0.0, (11, 13)),
    ((24, 16, 1, 1, 0, 1), "conv_bn", 0.1, (3, 5)),
]


@pytest.mark.parametrize(
    "conv_args, kernels, slope, hw",
    INTO_CONV_CASES,
    ids=[f"{c[1]}-{c[0]}-{c[2]}-{c[3][0]}x{c[3][1]}" for c in INTO_CONV_CASES],
)
def test_batch_norm_into_conv_matches_xla_on_one_and_four_devices(conv_args, kernels, slope, hw):
    """The BatchNorm -> LeakyReLU read through by the next layer (activation never stored, the
    BatchNorm's backward sums from that layer's input-gradient kernel) computes the two layers'
    loss and gradients, on one device and batch-parallel on four."""
    mesh = make_mesh(jax.devices()[:4])
    rng = np.random.default_rng(5)
    cin, cout, k, _, _, groups = conv_args
    args = (
        (rng.normal(size=(8, *hw, cin)) * 2 + 5).astype(np.float32),
        rng.uniform(0.5, 1.5, cin).astype(np.float32),
        rng.normal(size=cin).astype(np.float32),
        rng.normal(size=(k, k, cin // groups, cout)).astype(np.float32),
    )
    xla = bn_conv_loss_and_grads(conv_args, slope, native=False)
    one = bn_conv_loss_and_grads(conv_args, slope)
    four = bn_conv_loss_and_grads(conv_args, slope, mesh)
    text = one.lower(*args).as_text()
    assert f"@retinaface_{kernels}(" in text and f"@retinaface_{kernels}_grad(" in text
    # the first BatchNorm's sums come with the input gradient; its statistics from the moments
    # kernel (no kernel wrote x), the second's with the convolution's output
    assert text.count("@retinaface_bn_grad_sums(") == text.count("@retinaface_moments(") == 1
    assert len(stats_producers(text)) == 1
    assert "@retinaface_" not in xla.lower(*args).as_text()
    sharded = (jax.device_put(args[0], NamedSharding(mesh, P("data"))), *args[1:])
    compiled = four.lower(*sharded).compile().as_text()
    assert f"retinaface_{kernels}" in compiled and f"f32[2,{hw[0]},{hw[1]},{cin}]" in compiled
    (v0, g0), (v1, g1), (v4, g4) = xla(*args), one(*args), four(*sharded)
    for v, g in ((v1, g1), (v4, g4)):
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        for a, b in zip(g, g0, strict=True):  # sums of ~1e3 terms: rounding relative to the largest
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def chain_loss_and_grads(layers, mesh=None, native=True):
    """Jitted ``(x, kernels...) -> (loss, grads)`` of ``layers`` (``Conv2d`` arguments; each
    convolution followed by BatchNorm -> LeakyReLU(0.1)), read through wherever the kernels run
    it: the cotangents of each read-through BatchNorm's statistics then reach the kernel that
    wrote its input (``ops.StatsCotangent``)."""
    from retinaface_jax.models.layers import BatchNorm2d, Conv2d

    def loss(x, *kernels):
        convs = [Conv2d(*a, bias=False, rngs=nnx.Rngs(0)) for a in layers]
        norms = [BatchNorm2d(a[1]) for a in layers]
        for conv, kernel, norm in zip(convs, kernels, norms, strict=True):
            conv.kernel[...] = kernel
            norm.scale[...] = jnp.linspace(0.5, 1.5, norm.num_features)
        y, stats = train_layers.conv_with_stats(convs[0], x)
        for norm, conv in zip(norms, convs[1:]):
            y, stats = train_layers.batch_norm_into_conv(norm, y, 0.1, conv, stats)
        return jnp.sum(jnp.sin(train_layers.batch_norm(norms[-1], y, 0.1, stats)))

    def f(*args):
        with native_gradients(mesh) if native else contextlib.nullcontext():
            return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)

    return jax.jit(f)


# (Conv2d arguments: in, out, kernel size, stride, padding, groups) of MobileNet's chains: the
# RGB stem into a depthwise layer (its statistics' part added by its kernel-gradient kernel), a
# dense stride-2 layer into one (added by XLA), depthwise into pointwise and pointwise into
# depthwise layers (added by the gradient kernels as they read the cotangent)
CHAINS = [
    [(3, 8, 3, 2, 1, 1), (8, 8, 3, 1, 1, 8), (8, 16, 1, 1, 0, 1)],
    [(8, 16, 3, 2, 1, 1), (16, 16, 3, 1, 1, 16), (16, 24, 1, 1, 0, 1)],
    [(8, 16, 3, 1, 1, 1), (16, 16, 3, 2, 1, 16), (16, 32, 1, 1, 0, 1), (32, 32, 3, 1, 1, 32)],
    [(8, 24, 1, 1, 0, 1), (24, 24, 3, 2, 1, 24), (24, 16, 1, 1, 0, 1), (16, 16, 3, 2, 1, 16)],
]


@pytest.mark.parametrize(
    "layers", CHAINS, ids=["stem-dw-pw", "conv-dw-pw", "dw-pw-dw", "pw-dw-pw-dw"]
)
def test_read_through_chains_match_xla_on_one_and_four_devices(layers):
    mesh = make_mesh(jax.devices()[:4])
    rng = np.random.default_rng(7)
    args = [(rng.normal(size=(8, 12, 10, layers[0][0])) * 2 + 1).astype(np.float32)]
    for cin, cout, k, _, _, groups in layers:
        args.append((rng.normal(size=(k, k, cin // groups, cout)) / k).astype(np.float32))
    xla, one = chain_loss_and_grads(layers, native=False), chain_loss_and_grads(layers)
    four = chain_loss_and_grads(layers, mesh)
    text = one.lower(*args).as_text()
    # every read-through gradient kernel but the last adds its output's statistics' part
    grads = re.findall(r"@retinaface_(?:depthwise|conv)_bn_grad\(.*", text)
    assert len(grads) == len(layers) - 1
    assert [bool(re.search(r"stats = 1 :", g)) for g in grads].count(True) == len(layers) - 2
    # the RGB stem's kernel gradient adds its own statistics' part
    (stem_grad,) = re.findall(r"@retinaface_weight_grad\(.*", text)
    assert bool(re.search(r"stats = 1 :", stem_grad)) == (layers[0][0] == 3)
    sharded = (jax.device_put(args[0], NamedSharding(mesh, P("data"))), *args[1:])
    (v0, g0), (v1, g1), (v4, g4) = xla(*args), one(*args), four(*sharded)
    for v, g in ((v1, g1), (v4, g4)):
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        for a, b in zip(g, g0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))
        if layers[0][0] == 3:
            # the variance's part of the stem's kernel gradient is ~1e-5 of it (a BatchNorm's
            # output does not change with its input's scale), so it is checked this closely: the
            # part off by half gave 2.8e-4 here, rounding ~3e-5
            np.testing.assert_allclose(g[1], g0[1], rtol=0, atol=3e-6 * float(np.abs(g0[1]).max()))


def test_read_through_kernels_reject_bad_shapes():
    x, k = np.zeros((1, 4, 4, 8), np.float32), np.zeros((3, 3, 1, 8), np.float32)
    params, layer = ops.plain_layer(jnp.zeros((1, 1, 8, 16)), stride=1, padding=0)
    with pytest.raises(
        ValueError, match=r"conv_bn: expected a 1x1 stride-1 layer.*\(1, 4, 4, 16\)"
    ):
        ops.conv_bn(
            np.zeros((1, 4, 4, 16), np.float32), params, layer, np.ones(16), np.ones(16), 0.1
        )
    with pytest.raises(ValueError, match=r"conv_bn_grad: x \(1, 4, 4, 8\), expected"):
        ops.conv_bn_grad(x, params, layer, x, np.ones(16), np.ones(16), np.ones(16), 0.1)
    with pytest.raises(ValueError, match=r"depthwise_bn: expected \[8\] vectors.*'shift': \(4,\)"):
        ops.depthwise_bn(x, k, np.ones(8, np.float32), np.ones(4, np.float32), 0.1, 1)
    with pytest.raises(ValueError, match=r"depthwise_bn_grad: dy \(1, 4, 4, 8\), expected"):
        ops.depthwise_bn_grad(x, k, x, np.ones(8), np.ones(8), np.ones(8), 0.1, 2)
    bad = ops.StatsCotangent(x, np.zeros((1, 2, 8), np.float32))  # coef must be [N, 3, C]
    with pytest.raises(ValueError, match=r"depthwise_bn_grad: stats y .* / coef \(1, 2, 8\)"):
        ops.depthwise_bn_grad(x, k, x, np.ones(8), np.ones(8), np.ones(8), 0.1, 1, bad)
    rgb, dy = np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"weight_grad: stats y .* / coef \(1, 2, 8\)"):
        ops.weight_grad(rgb, dy, 3, 2, 1, ops.StatsCotangent(dy, bad.coef))
    good = ops.StatsCotangent(x, np.zeros((1, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"weight_grad: stats is supported for the 3-channel"):
        ops.weight_grad(x, x, 1, 1, 0, good)
    with pytest.raises(ValueError, match=r"weight_grad: a uint8 x needs .* mean of shape None"):
        ops.weight_grad(rgb.astype(np.uint8), dy, 3, 2, 1)


# -- dense 3x3 stride-1 convolutions -------------------------------------------------------------


def dense_loss_and_grads(stride=1, padding=1, mesh=None, native=True):
    def loss(x, k):
        return jnp.sum(jnp.sin(conv_ops.conv2d(x, k, stride, padding, 1)))

    def f(x, k):
        with native_gradients(mesh) if native else contextlib.nullcontext():
            return jax.value_and_grad(loss, argnums=(0, 1))(x, k)

    return jax.jit(f)


# (batch, h, w, cin, cout, kernel, stride, padding): Winograd layers (16-lane spans, 8-lane
# remainders, one pixel), the narrow stem, and direct layers of other shapes
DENSE_CASES = [
    (2, 9, 11, 16, 16, 3, 1, 1),
    (1, 13, 10, 64, 32, 3, 1, 1),
    (2, 5, 7, 24, 40, 3, 1, 1),
    (4, 1, 1, 8, 8, 3, 1, 1),
    (2, 17, 14, 3, 8, 3, 2, 1),
    (1, 9, 12, 3, 16, 3, 1, 1),
    (1, 11, 9, 16, 24, 3, 2, 1),
    (2, 12, 10, 12, 16, 3, 1, 1),
    (1, 15, 13, 8, 16, 7, 2, 3),
    (2, 6, 5, 16, 8, 3, 1, 0),
    (2, 7, 9, 24, 40, 1, 1, 0),
    (1, 6, 8, 16, 8, 1, 2, 0),
]


@pytest.mark.parametrize(
    "n, h, w, cin, cout, k, s, p",
    DENSE_CASES,
    ids=[f"{c[0]}x{c[1]}x{c[2]}-{c[3]}to{c[4]}-k{c[5]}s{c[6]}p{c[7]}" for c in DENSE_CASES],
)
def test_dense_conv_and_its_gradients_match_xla(n, h, w, cin, cout, k, s, p):
    rng = np.random.default_rng([n, h, w, cin, cout, k, s, p])
    x = rng.normal(size=(n, h, w, cin)).astype(np.float32)
    kernel = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    native_fn = dense_loss_and_grads(s, p)
    xla_fn = dense_loss_and_grads(s, p, native=False)
    text = native_fn.lower(x, kernel).as_text()
    forward = (k, s) == (3, 1) and cin % 8 == 0  # Winograd forward; input gradient if pad 1
    backward = forward and p == 1
    pointwise_dx = (k, s) == (1, 1) and cin % 8 == 0  # dx: a 1x1 layer too
    assert text.count("@retinaface_conv_winograd(") == forward + backward
    assert text.count("@retinaface_conv(") == (not forward) + pointwise_dx
    assert text.count("@retinaface_weight_grad(") == 1
    assert "@retinaface_" not in xla_fn.lower(x, kernel).as_text()
    (v1, (dx1, dk1)), (v0, (dx0, dk0)) = native_fn(x, kernel), xla_fn(x, kernel)
    # Winograd F(4x4, 3x3)'s errors are ~1e-5 of a tensor's scale, not of each element; they
    # reach the kernel gradient through the loss's cotangent
    for got, ref, rtol in ((v1, v0, 1e-5), (dx1, dx0, 1e-4), (dk1, dk0, 1e-4)):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-5 * max(1.0, np.abs(ref).max()))
    with native_gradients():
        assert native_training.dense_applies(x, kernel, s, p)
        assert not native_training.dense_applies(x, kernel[..., :4], s, p)  # cout not 8k
        if k > 1:
            assert not native_training.dense_applies(x, kernel[:, :1], s, p)  # not square
        with jax.enable_x64(True):
            x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
            assert not native_training.dense_applies(x64, k64, s, p)
    assert not native_training.dense_applies(x, kernel, s, p)


def test_pointwise_layers_without_8k_outputs_take_xla_matmuls():
    """A 1x1 layer with a multiple of 8 outputs runs natively (forward, input gradient: 1x1
    layers; kernel gradient); with 4 outputs (no packed weight layout) XLA's matmuls."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 7, 9, 24)).astype(np.float32)
    kernel = rng.normal(size=(1, 1, 24, 40)).astype(np.float32)
    native_fn = dense_loss_and_grads(1, 0)
    text = native_fn.lower(x, kernel).as_text()
    assert text.count("@retinaface_conv(") == 2 and text.count("@retinaface_weight_grad(") == 1
    narrow = kernel[..., :4]
    assert "@retinaface_" not in native_fn.lower(x, narrow).as_text()
    (v1, (dx1, dk1)), (v0, (dx0, dk0)) = (
        native_fn(x, narrow),
        dense_loss_and_grads(1, 0, native=False)(x, narrow),
    )
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk1, dk0, rtol=1e-4, atol=1e-5)


# (batch, h, w, cin, cout, padding) of 3x3 stride-1 kernel gradients, run by Winograd F(3x3, 4x4):
# sizes not multiples of the 4x4 tile, pads 0-2, channel groups (one image on two threads),
# 8-lane remainders, a 40x40 pyramid level
WGRAD_WINOGRAD_CASES = [
    (3, 9, 7, 8, 8, 1),
    (1, 13, 10, 64, 32, 1),
    (2, 6, 11, 24, 40, 0),
    (1, 5, 5, 16, 24, 2),
    (2, 40, 40, 64, 64, 1),
]


@pytest.mark.parametrize(
    "n, h, w, cin, cout, p",
    WGRAD_WINOGRAD_CASES,
    ids=[f"{c[0]}x{c[1]}x{c[2]}-{c[3]}to{c[4]}-p{c[5]}" for c in WGRAD_WINOGRAD_CASES],
)
def test_winograd_kernel_gradient_matches_float64(n, h, w, cin, cout, p):
    """Per image, against the direct sum in float64: errors within 1e-5 of the gradient's scale
    (float32 summation alone reaches a few 1e-6)."""
    rng = np.random.default_rng([n, h, w, cin, cout, p])
    x = rng.normal(size=(n, h, w, cin)).astype(np.float32) + 0.5
    oh, ow = h + 2 * p - 2, w + 2 * p - 2
    dy = rng.normal(size=(n, oh, ow, cout)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, g: ops.weight_grad(x, g, 3, 1, p))(x, dy))
    xp = np.pad(x.astype(np.float64), ((0, 0), (p, p), (p, p), (0, 0)))
    ref = np.zeros((n, 3, 3, cin, cout))
    for i in range(3):
        for j in range(3):
            ref[:, i, j] = np.einsum("nhwc,nhwo->nco", xp[:, i : i + oh, j : j + ow], dy)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_weight_grad_rejects_mismatched_shapes():
    x = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"weight_grad: x \(2, 8, 8, 3\) and dy \(2, 8, 8, 8\)"):
        ops.weight_grad(x, np.zeros((2, 8, 8, 8), np.float32), 3, 2, 1)
    with pytest.raises(ValueError, match="multiple of 8 output channels"):
        ops.weight_grad(x, np.zeros((2, 4, 4, 4), np.float32), 3, 2, 1)


def test_dense_conv_batch_parallel_on_four_devices():
    mesh = make_mesh(jax.devices()[:4])
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 10, 12, 16)).astype(np.float32)
    k = (rng.normal(size=(3, 3, 16, 24)) / 12).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    four, one = dense_loss_and_grads(mesh=mesh), dense_loss_and_grads()
    compiled = four.lower(xs, k).compile().as_text()
    assert "retinaface_conv_winograd" in compiled and "f32[2,10,12,16]" in compiled, (
        "not per device"
    )
    (v4, (dx4, dk4)), (v1, (dx1, dk1)) = four(xs, k), one(x, k)
    np.testing.assert_allclose(v4, v1, rtol=1e-5)
    np.testing.assert_allclose(dx4, dx1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk4, dk1, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- matching (loss._best_overlaps)


def _iou_float32(truths: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """[B, M, P] IoU of point-form boxes in numpy float32, every operation rounded (no FMA): the
    original's expression, which the native kernel computes."""
    a = [truths[..., i][..., None] for i in range(4)]
    b = [priors[:, i] for i in range(4)]
    zero = np.float32(0)
    iw = np.maximum(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]), zero)
    ih = np.maximum(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]), zero)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("size", [64, 336, 640])
def test_match_overlaps_equals_dense_first_index_argmax(size):
    """The one-pass kernel against a dense numpy IoU with first-index argmax, at prior counts
    that are and are not multiples of its 16-lane vectors and 1024-prior blocks: 168, 4,704 and
    16,800 priors. Duplicate faces (ties between rows), faces that are not usable among and after
    usable ones, an image without faces."""
    from retinaface_jax.box_utils import point_form
    from retinaface_jax.config import cfg_mnet
    from retinaface_jax.priors import prior_box

    priors = np.asarray(point_form(prior_box(cfg_mnet, (size, size))), np.float32)
    rng = np.random.default_rng(size)
    b, m = 4, 37
    xy = rng.uniform(-0.1, 0.9, (b, m, 2))
    wh = rng.uniform(0.002, 0.4, (b, m, 2))
    truths = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    truths[0, 5] = truths[0, 2]  # an exact duplicate: the first row wins every tie
    usable = rng.uniform(size=(b, m)) < 0.6
    usable[0, 2] = usable[0, 5] = True
    usable[1] = False  # an image without faces
    usable[2, :-1] = False
    usable[2, -1] = True  # only the last row is real
    call = jax.jit(ops.match_overlaps)
    got = [np.asarray(x) for x in call(truths, usable, priors)]
    iou = np.where(usable[..., None], _iou_float32(truths, priors), np.float32(-1))
    np.testing.assert_array_equal(got[0], iou.max(2))
    np.testing.assert_array_equal(got[1], np.where(usable, iou.argmax(2), 0))
    np.testing.assert_array_equal(got[2], iou.max(1))
    np.testing.assert_array_equal(got[3], np.where(usable.any(1)[:, None], iou.argmax(1), 0))
    assert (got[2][1] == -1).all() and (got[3][1] == 0).all()


def _golden_match(g, mesh=None):
    from retinaface_jax.config import cfg_mnet
    from retinaface_jax.loss import match

    def fn(targets, valid, best_overlaps=None):
        return match(
            g["priors"],
            targets,
            valid,
            cfg_mnet.overlap_threshold,
            cfg_mnet.variance,
            best_overlaps=best_overlaps,
        )

    targets, valid = g["targets"], g["target_valid"]
    if mesh is not None:
        targets, valid = (
            jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (targets, valid)
        )
    with native_gradients(mesh):  # (the kernel runs per device of the active mesh)
        native_fn = jax.jit(partial(fn, best_overlaps=native_training.match_overlaps))
        native_fn = native_fn.lower(targets, valid)
    assert "@retinaface_match_overlaps(" in native_fn.as_text()
    native = [np.asarray(x) for x in native_fn.compile()(targets, valid)]
    xla_fn = jax.jit(fn).lower(targets, valid)
    assert "@retinaface_match_overlaps(" not in xla_fn.as_text()
    xla = [np.asarray(x) for x in xla_fn.compile()(targets, valid)]
    return native, xla


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_match_equals_golden_and_xla(golden, seed):
    """``match`` inside a CPU train step (the native overlaps) gives the original's targets, and
    the same targets as XLA's chunked loop, on one and on four devices."""
    g = golden(f"loss_case_seed{seed}")
    native, xla = _golden_match(g)
    for a, b in zip(native, xla, strict=True):
        np.testing.assert_array_equal(a, b)
    loc_t, conf_t, landm_t = native
    np.testing.assert_array_equal(conf_t, g["match_conf_t"])
    np.testing.assert_allclose(loc_t, g["match_loc_t"], rtol=1e-5, atol=1e-5)
    lm = g["match_conf_t"] > 0
    np.testing.assert_allclose(landm_t[lm], g["match_landm_t"][lm], rtol=1e-5, atol=1e-5)
    if g["targets"].shape[0] % 4 == 0:
        four, _ = _golden_match(g, make_mesh(jax.devices()[:4]))
        for a, b in zip(four, native, strict=True):
            np.testing.assert_array_equal(a, b)


def test_match_overlaps_rejects_bad_shapes():
    truths = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(Exception, match="retinaface_match_overlaps: expected truths"):
        jax.block_until_ready(
            jax.ffi.ffi_call(
                ops.MATCH_OVERLAPS_TARGET,
                (
                    jax.ShapeDtypeStruct((2, 3), jnp.float32),
                    jax.ShapeDtypeStruct((2, 3), jnp.int32),
                    jax.ShapeDtypeStruct((2, 5), jnp.float32),
                    jax.ShapeDtypeStruct((2, 5), jnp.int32),
                ),
            )(truths, np.zeros((2, 3), bool), np.zeros((5, 3), np.float32))
        )
