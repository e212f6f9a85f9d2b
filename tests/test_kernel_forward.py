"""Numerics of the native CPU kernels (``retinaface_jax.backends.native``) against independent references.

* ``ops.conv`` / ``ops.conv_dw`` against ``lax.conv_general_dilated`` + bias + activation in jnp,
  reading their layer's slices of one parameter buffer (``ops.ParamBuffer``);
* ``ops.topk_nms`` against ``jax.lax.top_k`` + ``postprocess.greedy_nms`` (exact indices and counts)
  and ``postprocess.detections_native`` against ``select_candidates`` + ``nms_rows`` on real model
  outputs;
* ``kernel_forward`` against ``model(x)`` (eval) for both backbones;
* ``Detector(kernels="native")`` against ``Detector(kernels="xla")`` on real images, padded
  (masked) and exact buckets;
* clear errors on bad input (shapes, offsets outside the parameter buffer) and ``choose_kernels``.

The kernels must be available: every test fails when they do not build, unless
``RETINAFACE_NATIVE_KERNELS=0`` turns them off explicitly (then the module is skipped).
"""

from __future__ import annotations

import functools
import os
import re
from collections import OrderedDict

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from program_inputs import trace_detector_program

from retinaface_jax.backends.native import build as native
from retinaface_jax.backends.native import ops
from retinaface_jax.backends.native.build import native_kernels_available

MEAN = np.array([104.0, 117.0, 123.0], np.float32)
HIGHEST = lax.Precision.HIGHEST


@pytest.fixture(scope="module", autouse=True)
def kernels_required():
    """Fail when the kernels are unavailable, unless they are switched off explicitly."""
    switch = os.environ.get(native.ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        pytest.skip(f"native CPU kernels disabled by {native.ENV_SWITCH}={switch}")
    assert native_kernels_available(), (
        "the native CPU kernels did not build or register (see the RuntimeWarning); "
        f"set {native.ENV_SWITCH}=0 to skip these tests"
    )


def act(v, slope):
    return jnp.where(v > 0, v, v * slope)


def random_slopes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-channel negative slopes: 0 (ReLU), 0.1 (LeakyReLU), 1 (none) and arbitrary values."""
    choices = np.array([0.0, 0.1, 1.0], np.float32)
    s = np.where(rng.random(n) < 0.75, rng.choice(choices, n), rng.uniform(-0.5, 2.0, n))
    s[:3] = choices[: min(3, n)]
    return rng.permutation(s).astype(np.float32)


def assert_close(got, ref, *, rtol=1e-4, atol=1e-5, what=""):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), what
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=what)


# -- ops.conv ---------------------------------------------------------------------------------

# (batch, h, w, channels of x, cin, cin_offset, cout, kernel, stride, padding)
CONV_CASES = [
    # narrow inputs (cin < 8: the stem's im2col path; 12-pixel direct tiles need a wide row)
    (1, 33, 17, 3, 3, 0, 8, 3, 2, 1),
    (2, 5, 64, 3, 3, 0, 8, 3, 2, 1),
    (1, 7, 9, 3, 3, 0, 16, 3, 1, 1),
    (1, 33, 17, 3, 3, 0, 24, 3, 2, 0),
    (2, 7, 9, 8, 3, 2, 8, 3, 1, 1),  # narrow slice of a wider tensor
    # dense
    (1, 7, 9, 8, 8, 0, 8, 3, 1, 1),
    (2, 7, 9, 8, 8, 0, 48, 3, 2, 1),
    (1, 33, 17, 16, 16, 0, 16, 3, 1, 1),
    (2, 33, 17, 16, 16, 0, 24, 3, 2, 1),
    (1, 5, 64, 24, 24, 0, 48, 3, 1, 1),
    (1, 33, 17, 24, 24, 0, 8, 3, 2, 0),
    (1, 7, 9, 64, 64, 0, 16, 3, 1, 1),  # K split into blocks (576 = 3 x 192)
    (2, 5, 64, 64, 64, 0, 24, 3, 2, 1),
    (1, 7, 9, 128, 128, 0, 16, 3, 1, 1),  # uneven K split (9 taps: 2+2+2+2+1)
    (1, 2, 3, 16, 16, 0, 8, 3, 2, 1),  # output smaller than one tile
    # 1x1
    (1, 1, 1, 64, 64, 0, 48, 1, 1, 0),
    (2, 1, 1, 8, 8, 0, 8, 1, 1, 0),
    (1, 33, 17, 64, 64, 0, 24, 1, 1, 0),
    (2, 7, 9, 24, 24, 0, 16, 1, 2, 0),
    # channel slices (SSH: the second and third layers read part of the previous output)
    (1, 7, 9, 32, 8, 16, 8, 3, 1, 1),
    (2, 33, 17, 24, 16, 8, 16, 3, 1, 1),
    (1, 7, 9, 40, 16, 8, 24, 3, 1, 1),  # trailing channels after the slice
    (1, 5, 64, 72, 64, 4, 16, 1, 1, 0),
    # Winograd F(4x4, 3x3) edges: a 1x2 output (pad 0), pad 2, odd sizes, a wide cin
    (1, 3, 4, 8, 8, 0, 8, 3, 1, 0),
    (2, 6, 5, 16, 16, 0, 8, 3, 1, 2),
    (1, 13, 31, 256, 256, 0, 24, 3, 1, 1),
]
# every case directly; the 3x3 stride-1 ones with cin % 8 == 0 by Winograd too
CONV_RUNS = [(*c, False) for c in CONV_CASES] + [
    (*c, True) for c in CONV_CASES if ops.winograd_applies(c[7], c[8], c[4])
]


def conv_reference(x, w, b, slope, *, stride, padding, cin, cin_offset):
    v = lax.conv_general_dilated(
        x[..., cin_offset : cin_offset + cin],
        w,
        (stride, stride),
        [(padding, padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )
    return act(v + b, slope)


def build_conv(rng, wk, b, slope, *, stride, padding, cin_offset=0, winograd=None):
    """A conv layer in a buffer with huge values before and after it: reading any parameter
    outside the layer's own slices shows in the output. -> (layer, buffer array)."""
    buf = ops.ParamBuffer()
    buf.add(rng.normal(0, 1e6, 37).astype(np.float32))  # odd size: the layer starts aligned
    layer = ops.conv_layer(
        buf, wk, b, slope, stride=stride, padding=padding, cin_offset=cin_offset, winograd=winograd
    )
    buf.add(np.full(50, 1e6, np.float32))
    return layer, buf.array()


@pytest.mark.parametrize(
    "n, h, w, cx, cin, off, cout, k, s, pad, winograd",
    CONV_RUNS,
    ids=[
        f"n{c[0]}-{c[1]}x{c[2]}-x{c[3]}-cin{c[4]}@{c[5]}-cout{c[6]}-k{c[7]}s{c[8]}p{c[9]}"
        + ("-winograd" if c[10] else "")
        for c in CONV_RUNS
    ],
)
def test_conv_matches_lax(n, h, w, cx, cin, off, cout, k, s, pad, winograd):
    rng = np.random.default_rng([n, h, w, cx, cin, off, cout, k, s, pad])
    x = rng.normal(size=(n, h, w, cx)).astype(np.float32)
    if off or cin != cx:
        # channels outside the slice are huge: reading any of them shows in the output
        outside = np.ones(cx, bool)
        outside[off : off + cin] = False
        x[..., outside] = 1e6
    wk = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    b = rng.normal(0, 0.5, cout).astype(np.float32)
    slope = random_slopes(rng, cout)
    layer, params = build_conv(
        rng, wk, b, slope, stride=s, padding=pad, cin_offset=off, winograd=winograd
    )
    assert layer == ops.ConvLayer(
        layer.w, layer.b, layer.slope, cin, cout, k, s, pad, off, winograd
    )
    assert layer.w % 16 == layer.b % 16 == layer.slope % 16 == 0 and layer.w > 0

    got = jax.jit(lambda x, p: ops.conv(x, p, layer))(x, jax.device_put(params))
    ref = jax.jit(
        lambda x: conv_reference(x, wk, b, slope, stride=s, padding=pad, cin=cin, cin_offset=off)
    )(x)
    assert got.shape == (n, (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1, cout)
    # F(4x4, 3x3)'s transforms (constants 1/6, 1/24, products up to 8 x 8 x 5 x 5) cost about
    # one decimal digit: errors up to ~2e-5 on these unit-scale outputs, 1e-5 directly
    assert_close(got, ref, atol=4e-5 if winograd else 1e-5, what="ops.conv")
    # the activation really ran: some outputs are negative and were scaled by slopes != 1
    assert (np.asarray(ref) < 0).any() and (np.asarray(ref) > 0).any()


def test_conv_reads_cin_from_the_kernel_at_cin_offset():
    """The layer's ``cin`` is the kernel's; ``cin_offset`` picks where the slice starts (here the
    trailing 16 of 24 channels, i.e. the rest of the channels, as an SSH layer reads them)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 9, 11, 24)).astype(np.float32)
    wk = (rng.normal(size=(3, 3, 16, 16)) / 12).astype(np.float32)
    b, slope = np.zeros(16, np.float32), random_slopes(rng, 16)
    layer, params = build_conv(rng, wk, b, slope, stride=1, padding=1, cin_offset=8)
    assert (layer.cin, layer.cin_offset) == (16, 8)
    got = jax.jit(lambda x: ops.conv(x, params, layer))(x)  # numpy params, closed over
    ref = conv_reference(x, wk, b, slope, stride=1, padding=1, cin=16, cin_offset=8)
    assert_close(got, ref, what="ops.conv cin_offset")


def test_layers_share_one_buffer():
    """Two layers of one buffer, chained in one program, each reading only its own slices."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 9, 11, 8)).astype(np.float32)
    w1 = (rng.normal(size=(3, 3, 8, 24)) / 8).astype(np.float32)
    w2 = (rng.normal(size=(1, 1, 16, 8)) / 4).astype(np.float32)
    b1, b2 = rng.normal(0, 0.5, 24).astype(np.float32), rng.normal(0, 0.5, 8).astype(np.float32)
    s1, s2 = random_slopes(rng, 24), random_slopes(rng, 8)
    buf = ops.ParamBuffer()
    l1 = ops.conv_layer(buf, w1, b1, s1, stride=2, padding=1)
    l2 = ops.conv_layer(buf, w2, b2, s2, stride=1, padding=0, cin_offset=4)
    params = buf.array()
    got = jax.jit(lambda x, p: ops.conv(ops.conv(x, p, l1), p, l2))(x, params)
    mid = conv_reference(x, w1, b1, s1, stride=2, padding=1, cin=8, cin_offset=0)
    ref = conv_reference(mid, w2, b2, s2, stride=1, padding=0, cin=16, cin_offset=4)
    assert_close(got, ref, what="two layers of one buffer")


def test_param_buffer_layout():
    buf = ops.ParamBuffer()
    assert buf.array().dtype == np.float32 and buf.array().shape == (0,)
    parts = [np.arange(n, dtype=np.float64) + 100 * i for i, n in enumerate((1, 17, 16, 3))]
    offsets = [buf.add(a) for a in parts]
    assert offsets == [0, 16, 48, 64]  # every array starts on a 16-float (64-byte) boundary
    flat = buf.array()
    assert flat.dtype == np.float32 and flat.shape == (80,)
    for off, a in zip(offsets, parts, strict=True):
        np.testing.assert_array_equal(flat[off : off + a.size], a.astype(np.float32))
    assert buf.add(np.ones((2, 3), np.float32)) == 80  # flattened
    np.testing.assert_array_equal(buf.array()[80:86], np.ones(6, np.float32))


# -- ops.conv_dw ------------------------------------------------------------------------------

# (batch, h, w, C, cout, stride)
CONV_DW_CASES = [
    (1, 9, 13, 8, 16, 1),
    (2, 9, 13, 16, 24, 2),
    (1, 16, 16, 32, 8, 2),
    (2, 16, 16, 16, 16, 1),
    (2, 1, 7, 8, 8, 1),
    (1, 1, 7, 32, 24, 2),
    (1, 33, 5, 8, 24, 2),
    (1, 2, 2, 16, 8, 1),
]


def conv_dw_reference(x, kd, bd, sd, kp, bp, sp, *, stride):
    c = x.shape[-1]
    v = lax.conv_general_dilated(
        x,
        kd.reshape(3, 3, 1, c),
        (stride, stride),
        [(1, 1)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=HIGHEST,
    )
    v = act(v + bd, sd)
    return act(jnp.einsum("nhwc,co->nhwo", v, kp, precision=HIGHEST) + bp, sp)


def build_dw(kd, bd, sd, kp, bp, sp, *, stride, junk=None):
    """A conv_dw layer (pointwise first, as ``kernel_params`` adds them) -> (layer, buffer)."""
    buf = ops.ParamBuffer()
    if junk is not None:
        buf.add(junk)
    c, cout = kp.shape
    pw = ops.conv_layer(buf, kp.reshape(1, 1, c, cout), bp, sp, stride=1, padding=0)
    layer = ops.dw_layer(buf, kd.reshape(3, 3, 1, c), bd, sd, pw, stride=stride)
    if junk is not None:
        buf.add(junk)
    return layer, buf.array()


@pytest.mark.parametrize(
    "n, h, w, c, cout, s",
    CONV_DW_CASES,
    ids=[f"n{c[0]}-{c[1]}x{c[2]}-c{c[3]}-cout{c[4]}-s{c[5]}" for c in CONV_DW_CASES],
)
def test_conv_dw_matches_lax(n, h, w, c, cout, s):
    rng = np.random.default_rng([n, h, w, c, cout, s])
    x = rng.normal(size=(n, h, w, c)).astype(np.float32)
    kd = (rng.normal(size=(3, 3, c)) / 3).astype(np.float32)
    bd = rng.normal(0, 0.5, c).astype(np.float32)
    sd = random_slopes(rng, c)
    kp = (rng.normal(size=(c, cout)) / np.sqrt(c)).astype(np.float32)
    bp = rng.normal(0, 0.5, cout).astype(np.float32)
    sp = random_slopes(rng, cout)
    junk = rng.normal(0, 1e6, 21).astype(np.float32)  # around the layer: must not be read
    layer, params = build_dw(kd, bd, sd, kp, bp, sp, stride=s, junk=junk)
    assert (layer.channels, layer.stride, layer.pw.cin, layer.pw.cout) == (c, s, c, cout)

    got = jax.jit(lambda x, p: ops.conv_dw(x, p, layer))(x, jax.device_put(params))
    ref = jax.jit(lambda x: conv_dw_reference(x, kd, bd, sd, kp, bp, sp, stride=s))(x)
    assert got.shape == (n, (h - 1) // s + 1, (w - 1) // s + 1, cout)
    assert_close(got, ref, what="ops.conv_dw")


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("cout", [4, 12, 20])
def test_pack_weights_rejects_cout_not_multiple_of_8(cout):
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.pack_weights(np.zeros((27, cout), np.float32))


def test_pack_weights_layout():
    """Blocks of 16 output channels [cout/16][K][16], then one [K][8] block."""
    w2 = np.arange(5 * 40, dtype=np.float32).reshape(5, 40)
    packed = ops.pack_weights(w2)
    assert packed.dtype == np.float32 and packed.shape == (200,)
    expected = np.concatenate(
        [w2[:, 0:16].reshape(-1), w2[:, 16:32].reshape(-1), w2[:, 32:40].reshape(-1)]
    )
    np.testing.assert_array_equal(packed, expected)


def test_conv_layer_packs_into_the_buffer():
    rng = np.random.default_rng(5)
    wk = rng.normal(size=(3, 3, 4, 24)).astype(np.float32)
    b, slope = rng.normal(size=24).astype(np.float32), random_slopes(rng, 24)
    buf = ops.ParamBuffer()
    buf.add(np.zeros(5, np.float32))
    layer = ops.conv_layer(buf, wk, b, slope, stride=2, padding=1)
    flat = buf.array()
    packed = ops.pack_weights(wk.reshape(-1, 24))
    np.testing.assert_array_equal(flat[layer.w : layer.w + packed.size], packed)
    np.testing.assert_array_equal(flat[layer.b : layer.b + 24], b)
    np.testing.assert_array_equal(flat[layer.slope : layer.slope + 24], slope)
    assert layer.w == 16 and layer.b >= layer.w + packed.size and layer.slope >= layer.b + 24


@pytest.mark.parametrize(
    "kernel, nb, ns, match",
    [
        ((3, 1, 8, 8), 8, 8, "square kernel"),
        ((3, 3, 8, 16), 8, 16, "bias"),
        ((3, 3, 8, 16), 16, 8, "slope"),
        ((1, 1, 8, 12), 12, 12, "multiple of 8"),
    ],
    ids=["not-square", "bias", "slope", "cout-12"],
)
def test_conv_layer_rejects_bad_shapes(kernel, nb, ns, match):
    buf = ops.ParamBuffer()
    with pytest.raises(ValueError, match=match):
        ops.conv_layer(
            buf,
            np.zeros(kernel, np.float32),
            np.zeros(nb, np.float32),
            np.zeros(ns, np.float32),
            stride=1,
            padding=0,
        )
    assert buf.array().size == 0  # nothing was added


@pytest.mark.parametrize(
    "kernel, pw_cin, pw_k",
    [((3, 3, 1, 12), 12, 1), ((2, 2, 1, 8), 8, 1), ((3, 3, 1, 16), 8, 1), ((3, 3, 1, 8), 8, 3)],
    ids=["channels-12", "kernel-2x2", "pointwise-cin", "pointwise-3x3"],
)
def test_dw_layer_rejects_bad_shapes(kernel, pw_cin, pw_k):
    c = kernel[-1]
    buf = ops.ParamBuffer()
    pw = ops.conv_layer(
        buf,
        np.zeros((pw_k, pw_k, pw_cin, 8), np.float32),
        np.zeros(8, np.float32),
        np.ones(8, np.float32),
        stride=1,
        padding=pw_k // 2,
    )
    size = buf.array().size
    with pytest.raises(ValueError, match="dw_layer"):
        ops.dw_layer(buf, np.zeros(kernel, np.float32), np.zeros(c), np.ones(c), pw, stride=1)
    assert buf.array().size == size


def _bad_call(fn):
    with pytest.raises(Exception) as info:
        jax.block_until_ready(fn())
    assert isinstance(info.value, jax.errors.JaxRuntimeError), type(info.value)
    return str(info.value)


# (kernel name, weights size) of the 3x3 8 -> 16 layer of _small_conv run directly / by Winograd
SMALL_CONV = {
    False: ("retinaface_conv", 9 * 8 * 16),
    True: ("retinaface_conv_winograd", 36 * 8 * 16),
}


def _small_conv(winograd: bool):
    """A 3x3 8 -> 16 layer at offset 0 of its own buffer: weights [0, nw), bias at nw, slopes at
    nw + 16, nw + 32 floats in all (nw: 1152 direct, 4608 Winograd)."""
    rng = np.random.default_rng(0)
    wk = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    buf = ops.ParamBuffer()
    layer = ops.conv_layer(
        buf,
        wk,
        np.zeros(16, np.float32),
        np.ones(16, np.float32),
        stride=1,
        padding=1,
        winograd=winograd,
    )
    nw = SMALL_CONV[winograd][1]
    assert (layer.w, layer.b, layer.slope) == (0, nw, nw + 16)
    return layer, buf.array(), rng.normal(size=(1, 7, 9, 8)).astype(np.float32)


@pytest.mark.parametrize("winograd", [False, True], ids=["direct", "winograd"])
@pytest.mark.parametrize("what", ["weights", "bias", "slope"])
def test_conv_truncated_buffer_names_the_kernel(winograd, what):
    name, nw = SMALL_CONV[winograd]
    # buffer size, then the size and offset of the slice that no longer fits
    size, n, offset = {
        "weights": (nw - 1, nw, 0),
        "bias": (nw + 8, 16, nw),
        "slope": (nw + 28, 16, nw + 16),
    }[what]
    layer, params, x = _small_conv(winograd)
    conv = jax.jit(lambda x, p: ops.conv(x, p, layer))
    msg = _bad_call(lambda: conv(x, params[:size]))
    assert f"{name} {what}" in msg, msg
    assert "do not fit the parameter buffer" in msg, msg
    assert f"{n} values at offset {offset}" in msg and f"buffer of {size} values" in msg, msg
    jax.block_until_ready(conv(x, params))  # the full buffer is fine


@pytest.mark.parametrize("winograd", [False, True], ids=["direct", "winograd"])
@pytest.mark.parametrize(
    "field, value",
    [("w", 40), ("w", -16), ("b", 32 - 15), ("slope", 32), ("slope", -1)],
)
def test_conv_offsets_outside_the_buffer_name_the_kernel(winograd, field, value):
    """``value``: the offset, counted from the end of the weights when positive (except w)."""
    name, nw = SMALL_CONV[winograd]
    value = value + nw if value > 0 and field != "w" else value
    layer, params, x = _small_conv(winograd)
    bad = layer._replace(**{field: value})
    msg = _bad_call(lambda: jax.jit(lambda x, p: ops.conv(x, p, bad))(x, params))
    what = {"w": "weights", "b": "bias", "slope": "slope"}[field]
    assert f"{name} {what}" in msg and "do not fit the parameter buffer" in msg, msg
    assert f"at offset {value} " in msg, msg


@pytest.mark.parametrize("winograd", [False, True], ids=["direct", "winograd"])
def test_conv_slice_past_the_input_channels_names_the_kernel(winograd):
    layer, params, _ = _small_conv(winograd)
    # a channel slice reaching past the input's channels (8 channels from channel 4 of 8)
    bad = layer._replace(cin_offset=4)
    msg = _bad_call(
        lambda: jax.jit(lambda x: ops.conv(x, params, bad))(np.zeros((1, 7, 9, 8), np.float32))
    )
    assert SMALL_CONV[winograd][0] in msg and "inconsistent shapes" in msg, msg


# (batch, h, w, cout, stride, padding): the stem's direct 12-pixel tiles and the im2col edges
U8_CASES = [(1, 33, 40, 8, 2, 1), (2, 5, 64, 8, 2, 1), (1, 7, 9, 16, 1, 1), (2, 31, 29, 24, 2, 0)]


@pytest.mark.parametrize("n, h, w, cout, s, pad", U8_CASES)
def test_conv_on_uint8_equals_conv_on_mean_subtracted_float(n, h, w, cout, s, pad):
    """The kernel's own ``float(x) - mean`` gives the bits of the float32 path (one rounding)."""
    rng = np.random.default_rng([n, h, w, cout, s, pad])
    img = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    wk = (rng.normal(size=(3, 3, 3, cout)) / 5).astype(np.float32)
    b, slope = rng.normal(0, 0.5, cout).astype(np.float32), random_slopes(rng, cout)
    buf = ops.ParamBuffer()
    mean = buf.add(np.array([104.0, 117.0, 123.0], np.float32))
    layer = ops.conv_layer(buf, wk, b, slope, stride=s, padding=pad)
    params = jax.device_put(buf.array())
    got = jax.jit(lambda x, p: ops.conv(x, p, layer, mean=mean))(img, params)
    flt = img.astype(np.float32) - np.float32([104, 117, 123])
    np.testing.assert_array_equal(got, jax.jit(lambda x, p: ops.conv(x, p, layer))(flt, params))
    ref = conv_reference(flt, wk, b, slope, stride=s, padding=pad, cin=3, cin_offset=0)
    assert_close(got, ref, what="ops.conv uint8")


def test_conv_on_uint8_rejects_what_it_cannot_read():
    rng = np.random.default_rng(3)
    buf = ops.ParamBuffer()
    mean = buf.add(np.array([104.0, 117.0, 123.0], np.float32))
    stem = ops.conv_layer(
        buf,
        rng.normal(size=(3, 3, 3, 8)).astype(np.float32),
        np.zeros(8),
        np.ones(8),
        stride=2,
        padding=1,
    )
    params = buf.array()
    img = np.zeros((1, 9, 9, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 input needs a mean"):
        ops.conv(img, params, stem)  # no mean
    with pytest.raises(ValueError, match="uint8 input"):
        ops.conv(np.zeros((1, 9, 9, 4), np.uint8), params, stem, mean=mean)  # 4 != 3 channels
    # a mean outside the buffer is named
    msg = _bad_call(lambda: jax.jit(lambda x: ops.conv(x, params, stem, mean=params.size - 2))(img))
    assert "retinaface_conv_u8 mean" in msg and "do not fit the parameter buffer" in msg, msg


# -- ops.heads ----------------------------------------------------------------------------------


def _heads_case(rng, n, sizes, parts, cout):
    """Levels of ``sizes`` whose input is three channel prefixes (``parts``: (channels of the
    tensor, channels read)) of tensors whose other channels are huge -> (levels, params, ref)."""
    buf = ops.ParamBuffer()
    buf.add(rng.normal(0, 1e6, 21).astype(np.float32))
    levels, refs = [], []
    for h, w in sizes:
        xs = []
        for cx, cin in parts:
            x = rng.normal(size=(n, h, w, cx)).astype(np.float32)
            x[..., cin:] = 1e6  # reading past the slice shows in the output
            xs.append((jnp.asarray(x), cin))
        cin = sum(c for _, c in parts)
        wk = (rng.normal(size=(1, 1, cin, cout)) / np.sqrt(cin)).astype(np.float32)
        b, slope = rng.normal(0, 0.5, cout).astype(np.float32), random_slopes(rng, cout)
        layer = ops.conv_layer(buf, wk, b, slope, stride=1, padding=0)
        levels.append((layer, xs))
        f = np.concatenate([np.asarray(x)[..., :c] for x, c in xs], -1)
        ref = conv_reference(f, wk, b, slope, stride=1, padding=0, cin=cin, cin_offset=0)
        refs.append(np.asarray(ref).reshape(n, h * w, cout))
    buf.add(np.full(40, 1e6, np.float32))
    return levels, buf.array(), np.concatenate(refs, axis=1)


@pytest.mark.parametrize(
    "n, sizes, parts, cout",
    [
        (1, [(60, 80), (30, 40), (15, 20)], [(48, 32), (32, 16), (16, 16)], 32),  # mobilenet0.25
        (2, [(13, 7), (7, 4), (4, 2)], [(48, 32), (32, 16), (16, 16)], 24),  # odd; a [K][8] block
        (1, [(5, 9), (3, 5), (2, 3)], [(192, 128), (128, 64), (64, 64)], 32),  # resnet50's widths
    ],
    ids=["mobilenet-640x480", "odd-cout24", "resnet-widths"],
)
def test_heads_reads_the_concatenation_in_place(n, sizes, parts, cout):
    rng = np.random.default_rng([n, cout, *parts[0]])
    levels, params, ref = _heads_case(rng, n, sizes, parts, cout)
    got = jax.jit(lambda p: ops.heads(p, levels))(params)  # the inputs closed over
    assert got.shape == ref.shape == (n, sum(h * w for h, w in sizes), cout)
    assert_close(got, ref, what="ops.heads")


def test_heads_rejects_inconsistent_levels():
    rng = np.random.default_rng(11)
    parts = [(48, 32), (32, 16), (16, 16)]
    lv, params, _ = _heads_case(rng, 1, [(6, 8), (3, 4)], parts, 32)
    with pytest.raises(ValueError, match="three parts"):
        ops.heads(params, [(lv[0][0], lv[0][1][:2])])
    with pytest.raises(ValueError, match="cin"):
        ops.heads(params, [(lv[0][0], [lv[0][1][0], lv[0][1][1], (lv[0][1][2][0], 8)])])
    # a level whose tensors differ in size is named
    bad = [(lv[0][0], [lv[0][1][0], lv[1][1][1], lv[0][1][2]])]
    msg = _bad_call(lambda: jax.jit(lambda p: ops.heads(p, bad))(params))
    assert "retinaface_heads: level 0 input 1" in msg, msg
    # parameters cut short are named with the level
    msg = _bad_call(lambda: jax.jit(lambda p: ops.heads(p, lv))(params[: lv[1][0].b]))
    assert "retinaface_heads level 1 bias" in msg and "do not fit" in msg, msg


DW_PARTS = [
    ("wd", "depthwise weights"),
    ("bd", "depthwise bias"),
    ("sd", "depthwise slope"),
    ("pw.w", "pointwise weights"),
    ("pw.b", "pointwise bias"),
    ("pw.slope", "pointwise slope"),
]


def _small_dw():
    """A conv_dw layer C = 16 -> 8; its buffer holds nothing else."""
    c, cout = 16, 8
    z = np.zeros
    layer, params = build_dw(
        z((3, 3, c), np.float32),
        z(c, np.float32),
        np.ones(c, np.float32),
        z((c, cout), np.float32),
        z(cout, np.float32),
        np.ones(cout, np.float32),
        stride=1,
    )
    return layer, params, np.zeros((1, 5, 5, c), np.float32)


def _dw_replace(layer, field, value):
    if field.startswith("pw."):
        return layer._replace(pw=layer.pw._replace(**{field[3:]: value}))
    return layer._replace(**{field: value})


def _dw_slices(layer):
    """(field, offset, size) of each parameter slice of a conv_dw layer."""
    c, pw = layer.channels, layer.pw
    return {
        "wd": (layer.wd, 9 * c),
        "bd": (layer.bd, c),
        "sd": (layer.sd, c),
        "pw.w": (pw.w, c * pw.cout),
        "pw.b": (pw.b, pw.cout),
        "pw.slope": (pw.slope, pw.cout),
    }


@pytest.mark.parametrize("field, what", DW_PARTS, ids=[f for f, _ in DW_PARTS])
def test_conv_dw_offsets_outside_the_buffer_name_the_kernel(field, what):
    layer, params, x = _small_dw()
    jax.block_until_ready(jax.jit(lambda x: ops.conv_dw(x, params, layer))(x))
    offset, n = _dw_slices(layer)[field]
    size = params.size
    for value in (size - n + 1, -1):  # one float past the end; before the start
        bad = _dw_replace(layer, field, value)
        msg = _bad_call(lambda bad=bad: jax.jit(lambda x: ops.conv_dw(x, params, bad))(x))
        assert f"retinaface_conv_dw {what}" in msg, msg
        assert f"{n} values at offset {value} do not fit the parameter buffer" in msg, msg
    # the same layer with the buffer cut one float short of this slice's end
    msg = _bad_call(lambda: jax.jit(lambda x: ops.conv_dw(x, params[: offset + n - 1], layer))(x))
    assert "retinaface_conv_dw" in msg and "do not fit the parameter buffer" in msg, msg


# -- kernel_forward ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet(shared):
    from retinaface_jax import load_model

    model = load_model(shared / "data/weights/mobilenet0.25_Final.pth")
    model.eval()
    return model


@pytest.fixture(scope="module")
def resnet50(golden, tmp_path_factory):
    """ResNet50 RetinaFace. The official ResNet50 file is not in ../shared/data/weights, so this
    uses the deterministic seeded weights of golden/seeded_Resnet50_seed0 (the same ones
    test_model_parity checks against the original PyTorch model), written as a .pth file."""
    from seeded_weights import seeded_state_dict
    from torch_files import tensor, write_zip

    from retinaface_jax import load_model

    sd = seeded_state_dict(golden("seeded_Resnet50_seed0"))
    path = write_zip(
        tmp_path_factory.mktemp("resnet50") / "seeded.pth",
        OrderedDict((k, tensor(v)) for k, v in sd.items()),
    )
    model = load_model(path)
    model.eval()
    return model


def real_input(shared, n: int, h: int, w: int) -> np.ndarray:
    """A batch of real photos resized to h x w, BGR minus the mean (what the model sees)."""
    img = cv2.imread(str(shared / "data/images/kinghoowei_street.jpg"))
    views = [img, img[::-1, ::-1], img[: img.shape[0] // 2]]
    out = [cv2.resize(views[i % 3], (w, h), interpolation=cv2.INTER_AREA) for i in range(n)]
    return np.stack(out).astype(np.float32) - MEAN


@pytest.fixture(scope="module")
def mobilenet_kernels(mobilenet):
    from retinaface_jax.backends.native.kernel_forward import kernel_params

    return kernel_params(mobilenet)


@pytest.fixture(scope="module")
def resnet50_kernels(resnet50):
    from retinaface_jax.backends.native.kernel_forward import kernel_params

    return kernel_params(resnet50)


def compare_forward(model, kernels, x, *, body: bool) -> dict[str, float]:
    """``kernel_forward`` (``body=model.body.features`` if ``body``) against ``model(x)``."""
    from retinaface_jax.backends.native.kernel_forward import kernel_forward

    params, plan = kernels
    got = jax.jit(lambda m, p, x: kernel_forward(plan, p, x, m.body.features if body else None))(
        model, params, x
    )
    ref = jax.jit(lambda m, x: m(x))(model, x)
    diffs = {}
    for name, g, r in zip(("loc", "conf", "landms"), got, ref, strict=True):
        g, r = np.asarray(g), np.asarray(r)
        assert g.shape == r.shape, (name, g.shape, r.shape)
        assert np.isfinite(g).all(), name
        diff = float(np.abs(g - r).max())
        scale = max(1.0, float(np.abs(r).max()))
        diffs[name] = diff
        assert diff < 1e-4 * scale, f"{name}: max |native - xla| = {diff:.3g} (scale {scale:.3g})"
    print(f"max |kernel_forward - model(x)| at {x.shape}: {diffs}")
    return diffs


@pytest.mark.parametrize("shape", [(1, 97, 131), (2, 480, 640)], ids=["1x97x131", "2x480x640"])
def test_kernel_forward_matches_model_mobilenet(shared, mobilenet, mobilenet_kernels, shape):
    compare_forward(mobilenet, mobilenet_kernels, real_input(shared, *shape), body=False)


def test_kernel_forward_matches_model_resnet50(shared, resnet50, resnet50_kernels):
    assert not resnet50_kernels[1].mobilenet_body
    compare_forward(resnet50, resnet50_kernels, real_input(shared, 1, 96, 160), body=True)


def _layer_slices(layer) -> list[tuple[int, int]]:
    """(offset, size) of every parameter slice of a plan's layer."""
    if isinstance(layer, ops.DwLayer):
        c = layer.channels
        dw = [(layer.wd, 9 * c), (layer.bd, c), (layer.sd, c)]
        return dw + _layer_slices(layer.pw)
    taps = 16 if layer.winograd else layer.kernel_size**2  # Winograd: the 4x4 transformed tile
    return [
        (layer.w, taps * layer.cin * layer.cout),
        (layer.b, layer.cout),
        (layer.slope, layer.cout),
    ]


@pytest.mark.parametrize("backbone", ["mobilenet", "resnet50"])
def test_kernel_params_are_one_host_buffer_and_a_plan(request, backbone):
    from retinaface_jax.backends.native.kernel_forward import KernelPlan

    params, plan = request.getfixturevalue(f"{backbone}_kernels")
    assert isinstance(params, np.ndarray) and params.dtype == np.float32 and params.ndim == 1
    assert isinstance(plan, KernelPlan) and plan.mobilenet_body == (backbone == "mobilenet")
    names = set(plan.layers)
    assert any(n.startswith("body.") for n in names) == plan.mobilenet_body
    for expected in ("fpn.output1", "fpn.merge2", "ssh3.c", "heads.2"):
        assert expected in names, sorted(names)
    # the 3x3 stride-1 layers (FPN merges, SSH) run by Winograd, the others directly
    winograd = {n for n, layer in plan.layers.items() if getattr(layer, "winograd", False)}
    assert winograd == {"fpn.merge1", "fpn.merge2"} | {
        f"ssh{i}.{p}" for i in (1, 2, 3) for p in "abc"
    }, sorted(winograd)
    # every slice lies in the buffer, starts on a 16-float boundary, and no two overlap
    slices = sorted(s for layer in plan.layers.values() for s in _layer_slices(layer))
    slices = sorted([*slices, (plan.mean, 3)])
    np.testing.assert_array_equal(params[plan.mean : plan.mean + 3], [104, 117, 123])
    for (o1, n1), (o2, _) in zip(slices, slices[1:], strict=False):
        assert o1 + n1 <= o2, (o1, n1, o2)
    assert all(o % 16 == 0 and n > 0 for o, n in slices)
    assert slices[0][0] == 0 and slices[-1][0] + slices[-1][1] <= params.size
    assert params.size - (slices[-1][0] + slices[-1][1]) < 16  # nothing else in the buffer


def _avx512_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@pytest.fixture(scope="module")
def avx2_targets(tmp_path_factory):
    """The kernels built without AVX-512 (8-lane vectors only) and registered under their own
    target names: ``{ops constant name: prefixed target}`` (to monkeypatch into ``ops``)."""
    import ctypes

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETINAFACE_CACHE", str(tmp_path_factory.mktemp("avx2_cache")))
        mp.setattr(native, "CXXFLAGS", (*native.CXXFLAGS, "-mno-avx512f"))
        lib = ctypes.cdll.LoadLibrary(str(native.build()))
    for name, symbol in native.TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(f"avx2_{name}", capsule, platform="cpu")
    constants = (
        "CONV_TARGET",
        "CONV_DW_TARGET",
        "WINOGRAD_TARGET",
        "U8_TARGET",
        "HEADS_TARGET",
        "WEIGHT_GRAD_TARGET",
    )
    return lib, {c: f"avx2_{getattr(ops, c)}" for c in constants}


@pytest.mark.skipif(
    not (os.uname().machine == "x86_64" and _avx512_cpu()),
    reason="CPU without AVX-512: the kernels have one vector width here",
)
def test_avx512_and_avx2_builds_give_the_same_bits(
    shared, mobilenet_kernels, avx2_targets, monkeypatch
):
    """The AVX-512 build (16-lane tiles over 32 channels, 16-lane depthwise and Winograd
    transforms) adds the same products in the same order per output as the 8-lane build: the
    whole forward, uint8 and float, layers whose widths take the 8-lane remainders (24
    channels) and kernel gradients (Winograd and direct; 12- against 6-channel tiles) give
    identical bits."""
    from retinaface_jax.backends.native.kernel_forward import kernel_forward

    params, plan = mobilenet_kernels
    rng = np.random.default_rng(5)
    img = np.clip(np.rint(real_input(shared, 2, 97, 131) + MEAN), 0, 255).astype(np.uint8)
    buf = ops.ParamBuffer()
    w3 = (rng.normal(size=(3, 3, 24, 40)) / 15).astype(np.float32)
    wdw = rng.normal(size=(3, 3, 1, 24)).astype(np.float32)
    w1 = (rng.normal(size=(1, 1, 24, 56)) / 5).astype(np.float32)
    bias, slope = rng.normal(0, 0.5, 56).astype(np.float32), random_slopes(rng, 56)
    wino = ops.conv_layer(buf, w3, bias[:40], slope[:40], stride=1, padding=1, winograd=True)
    direct = ops.conv_layer(buf, w3, bias[:40], slope[:40], stride=2, padding=1)
    point = ops.conv_layer(buf, w1, bias, slope, stride=1, padding=0)
    dw = ops.dw_layer(buf, wdw, bias[:24], slope[:24], point, stride=1)
    small = buf.array()
    x24 = rng.normal(size=(2, 13, 17, 24)).astype(np.float32)
    dy40 = rng.normal(size=(2, 13, 17, 40)).astype(np.float32)
    rgb, dy16 = x24[..., :3].copy(), dy40[:, ::2, ::2, :16].copy()

    def make_run():  # a new function per build: JAX caches traces per function object
        def run():
            return (
                *kernel_forward(plan, params, img),
                *kernel_forward(plan, params, img.astype(np.float32) - MEAN),
                ops.conv(x24, small, wino),
                ops.conv(x24, small, direct),
                ops.conv_dw(x24, small, dw),
                ops.weight_grad(x24, dy40, 3, 1, 1),
                ops.weight_grad(x24, dy40[:, ::2, ::2], 3, 2, 1),
                ops.weight_grad(rgb, dy16, 3, 2, 1),  # the stem's: 27 vs 3 x 9 accumulators
            )

        return run

    wide = [np.asarray(a) for a in jax.jit(make_run())()]
    _, names = avx2_targets
    for constant, target in names.items():
        monkeypatch.setattr(ops, constant, target)
    hlo = jax.jit(make_run()).lower().as_text()
    assert all(f"@{target}(" in hlo for target in names.values()), "the 8-lane build did not run"
    narrow = [np.asarray(a) for a in jax.jit(make_run())()]
    for i, (a, b) in enumerate(zip(wide, narrow, strict=True)):
        assert a.shape == b.shape and np.isfinite(a).all(), i
        np.testing.assert_array_equal(a, b, err_msg=f"output {i}: AVX-512 vs AVX2 build")


@pytest.mark.parametrize("backbone", ["mobilenet", "resnet50"])
def test_kernel_forward_on_uint8_equals_mean_subtracted_float(request, shared, backbone):
    """A uint8 image (the stem kernel subtracts the mean; for ResNet50, XLA does) gives the bits of
    its float32 ``x - mean``, also inside a valid region (padded inputs: the mean is subtracted
    before the padded border is zeroed)."""
    from retinaface_jax.backends.native.kernel_forward import kernel_forward
    from retinaface_jax.backends.padded_region import PaddedRegion
    from retinaface_jax.backends.planned_forward import resnet_features

    model = request.getfixturevalue(backbone)
    params, plan = request.getfixturevalue(f"{backbone}_kernels")
    img = np.clip(np.rint(real_input(shared, 2, 64, 96) + MEAN), 0, 255).astype(np.uint8)
    flt = img.astype(np.float32) - MEAN

    def run(x, valid_hw=None):
        region = None if valid_hw is None else PaddedRegion(valid_hw, x.shape[1:3])
        body = None
        if not plan.mobilenet_body:
            body = functools.partial(resnet_features, model.body, region=region)
        return kernel_forward(plan, params, x, body, region)

    run = jax.jit(run)
    for got, ref in zip(run(img), run(flt), strict=True):
        np.testing.assert_array_equal(got, ref)
    valid = np.array([[64, 70], [40, 96]], np.int32)
    for got, ref in zip(run(img, valid), run(flt, valid), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_kernel_forward_rejects_bad_input(mobilenet_kernels, resnet50_kernels):
    from retinaface_jax.backends.native.kernel_forward import kernel_forward

    params, plan = mobilenet_kernels
    with pytest.raises(ValueError, match="NHWC"):
        kernel_forward(plan, params, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="float32 or uint8"):
        kernel_forward(plan, params, jnp.zeros((1, 32, 32, 3), jnp.int32))
    # a ResNet50 body runs on XLA: it must be passed
    params, plan = resnet50_kernels
    with pytest.raises(ValueError, match="body="):
        kernel_forward(plan, params, jnp.zeros((1, 32, 32, 3)))


# -- ops.topk_nms -----------------------------------------------------------------------------


def xla_topk_nms(scores, boxes, threshold, top_k: int, max_keep: int):
    """The XLA path's top-k + NMS (``select_candidates`` / ``nms_rows``): ``jax.lax.top_k`` then
    ``postprocess.greedy_nms`` per image, its kept positions mapped back to indices into P."""
    from retinaface_jax.inference.postprocess import greedy_nms

    k = min(top_k, scores.shape[1])
    top, idx = lax.top_k(scores, k)
    sorted_boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    pos, count = jax.vmap(lambda s, b: greedy_nms(s, b, threshold, max_keep))(top, sorted_boxes)
    keep = jnp.where(pos >= 0, jnp.take_along_axis(idx, jnp.maximum(pos, 0), axis=1), -1)
    return keep, count


def candidate_set(rng, b: int, p: int, *, missing: float, levels: int, boxes: str = "clusters"):
    """Scores [b, p] quantised to ``levels`` values (many exact ties) with a fraction ``missing``
    at -inf, and boxes [b, p, 4]:

    * ``clusters``: around a few centres (heavy overlaps), some with integer corners, exact
      duplicates, degenerate (zero or negative width) boxes;
    * ``nonfinite``: the same with some inf / NaN coordinates;
    * ``grid``: small boxes on an integer grid, whose IoUs are often exactly the threshold (the
      test ``IoU <= threshold`` decides them).
    """
    scores = (rng.integers(1, levels + 1, (b, p)) / levels).astype(np.float32)
    scores[rng.random((b, p)) < missing] = -np.inf
    if boxes == "grid":
        xy = rng.integers(0, int(2 * np.sqrt(p)), (b, p, 2))
        corners = np.concatenate([xy, xy + rng.integers(0, 10, (b, p, 2))], -1)
        return scores, corners.astype(np.float32)
    centres = rng.uniform(0, 640, (b, max(3, p // 40), 2))
    which = rng.integers(0, centres.shape[1], (b, p))
    c = np.take_along_axis(centres, which[..., None], axis=1) + rng.normal(0, 6, (b, p, 2))
    size = rng.uniform(4, 80, (b, p, 2))
    corners = np.concatenate([c - size / 2, c + size / 2], -1)
    integer = rng.random((b, p)) < 0.4
    corners[integer] = np.round(corners[integer])
    dup = rng.integers(0, p, (b, p // 10))
    for i in range(b):
        corners[i, dup[i]] = corners[i, dup[i][::-1]]  # duplicates of other candidates' boxes
        degenerate = rng.integers(0, p, p // 50)
        corners[i, degenerate, 2] = corners[i, degenerate, 0] - rng.integers(0, 3, degenerate.size)
        if boxes == "nonfinite":
            bad = rng.integers(0, p, p // 50)
            corners[i, bad, rng.integers(0, 4, bad.size)] = rng.choice(
                [np.inf, -np.inf, np.nan], bad.size
            )
    return scores, corners.astype(np.float32)


# (P, fraction at -inf, score levels, top_k, max_keep, threshold, boxes)
TOPK_CASES = [
    (300, 0.3, 16, 100, 750, 0.4, "clusters"),  # top_k < candidates, max_keep > top_k
    (300, 0.0, 8, 5000, 10, 0.3, "clusters"),  # top_k > P, max_keep small
    (1000, 0.5, 64, 200, 200, 0.7, "clusters"),
    (1500, 0.2, 32, 5000, 3, 0.4, "nonfinite"),
    (3000, 0.6, 1000, 5000, 750, 0.4, "clusters"),  # top_k > candidates
    (3000, 0.1, 50, 777, 5000, 0.3, "clusters"),  # top_k < candidates, max_keep > P
    (2000, 0.95, 20, 1000, 1, 0.7, "clusters"),
    (1000, 0.2, 32, 5000, 1000, 0.4, "grid"),
    (2500, 0.4, 100, 1500, 750, 0.3, "grid"),
    (600, 0.0, 16, 5000, 5000, 0.7, "grid"),
]


@pytest.mark.parametrize(
    "p, missing, levels, top_k, max_keep, thr, kind",
    TOPK_CASES,
    ids=[f"P{c[0]}-k{c[3]}-keep{c[4]}-thr{c[5]}-{c[6]}" for c in TOPK_CASES],
)
def test_topk_nms_matches_xla(p, missing, levels, top_k, max_keep, thr, kind):
    rng = np.random.default_rng([p, levels, top_k, max_keep, int(thr * 10)])
    scores, boxes = candidate_set(rng, 2, p, missing=missing, levels=levels, boxes=kind)
    candidates = np.isfinite(scores).sum(1)
    for i in range(2):
        if top_k < candidates[i]:
            # the top_k cut falls inside a run of equal scores: which ones get in is decided by
            # index (the first candidate left out gets the last one's score)
            order = np.lexsort((np.arange(p), -scores[i]))
            scores[i, order[top_k]] = scores[i, order[top_k - 1]]
    threshold = np.float32(thr)
    native_fn = jax.jit(ops.topk_nms, static_argnums=(3, 4))
    xla_fn = jax.jit(xla_topk_nms, static_argnums=(3, 4))
    keep, count = jax.device_get(native_fn(scores, boxes, threshold, top_k, max_keep))
    ref_keep, ref_count = jax.device_get(xla_fn(scores, boxes, threshold, top_k, max_keep))
    assert keep.shape == (2, max_keep) and keep.dtype == np.int32
    assert count.shape == (2,) and count.dtype == np.int32
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(keep, ref_keep)

    for i in range(2):
        n = count[i]
        kept = keep[i, :n]
        assert (keep[i, n:] == -1).all() and len(set(kept.tolist())) == n
        assert np.isfinite(scores[i, kept]).all()
        assert (np.diff(scores[i, kept]) <= 0).all()  # output order: score descending
        considered = min(top_k, candidates[i])
        assert n <= min(max_keep, considered)
        if considered:
            assert n >= 1 and kept[0] == np.flatnonzero(scores[i] == scores[i].max())[0]
    # the cases are not trivial: ties among the candidates that count and, where max_keep allows,
    # suppression
    for i in range(2):
        best = np.sort(scores[i][np.isfinite(scores[i])])[::-1][:top_k]
        assert len(np.unique(best)) < len(best)
    if max_keep >= top_k:
        assert (count < np.minimum(top_k, candidates)).any()
    if kind == "grid":  # some IoUs are exactly the threshold: 1 ulp less changes the result
        below = np.nextafter(threshold, np.float32(0))
        keep_below, _ = jax.device_get(xla_fn(scores, boxes, below, top_k, max_keep))
        assert not np.array_equal(keep_below, keep)


def test_topk_nms_edge_cases():
    rng = np.random.default_rng(3)
    scores, boxes = candidate_set(rng, 3, 64, missing=0.3, levels=4)
    scores[1] = -np.inf  # an image without candidates
    call = jax.jit(ops.topk_nms, static_argnums=(3, 4))
    keep, count = jax.device_get(call(scores, boxes, np.float32(0.4), 0, 5))  # top_k = 0
    assert (count == 0).all() and (keep == -1).all()
    keep, count = jax.device_get(call(scores, boxes, np.float32(0.4), 64, 64))
    assert count[1] == 0 and (keep[1] == -1).all() and count[0] > 0 and count[2] > 0
    ref_keep, ref_count = jax.device_get(xla_topk_nms(scores, boxes, np.float32(0.4), 64, 64))
    np.testing.assert_array_equal(keep, ref_keep)
    np.testing.assert_array_equal(count, ref_count)
    # boxes of positive area: threshold 1 suppresses nothing (every candidate kept, by score
    # then index), threshold -1 all but the best
    xy = rng.uniform(0, 100, (3, 64, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 30, (3, 64, 2))], -1).astype(np.float32)
    keep, count = jax.device_get(call(scores, boxes, np.float32(1.0), 64, 64))
    for i in range(3):
        order = sorted(np.flatnonzero(np.isfinite(scores[i])), key=lambda j: (-scores[i, j], j))
        assert keep[i, : count[i]].tolist() == order
    keep, count = jax.device_get(call(scores, boxes, np.float32(-1.0), 64, 64))
    np.testing.assert_array_equal(count, [1, 0, 1])


@pytest.fixture(scope="module")
def mobilenet_outputs(shared, mobilenet):
    """``model(x)`` for two real 480x640 images and what ``_detect_program`` derives from the
    input shape: ``(loc, conf, landms, priors, valid)``; the second image counts as 401x555
    (valid_hw), as if padded into this bucket."""
    from retinaface_jax.inference.postprocess import pixel_priors, prior_valid_mask

    x = real_input(shared, 2, 480, 640)
    loc, conf, landms = jax.jit(lambda m, x: m(x))(mobilenet, x)
    priors_np, strides_np = pixel_priors(mobilenet.cfg, 480, 640)
    priors, strides = jnp.asarray(priors_np), jnp.asarray(strides_np)
    valid = prior_valid_mask(priors, strides, jnp.asarray([[480, 640], [401, 555]], jnp.int32))
    return loc, conf, landms, priors, valid


@pytest.mark.parametrize(
    "conf_threshold, k, max_keep, nms_threshold",
    [
        (0.02, 5000, 750, 0.4),
        (0.005, 300, 750, 0.3),
        (0.02, 12600, 12600, 0.7),  # k = every prior at 480x640
        (0.1, 5000, 5, 0.4),
    ],
    ids=["defaults", "k300-thr0.3", "no-limits-thr0.7", "conf0.1-keep5"],
)
def test_detections_native_matches_xla(
    mobilenet, mobilenet_outputs, conf_threshold, k, max_keep, nms_threshold
):
    from retinaface_jax.inference.postprocess import detections_native, nms_rows, select_candidates

    loc, conf, landms, priors, valid = mobilenet_outputs
    resize = jnp.asarray([1.0, 0.8], jnp.float32)
    variances = tuple(mobilenet.cfg.variance)
    args = (loc, conf, landms, priors, valid, resize, np.float32(conf_threshold), variances, k)

    def xla(*args, nms_threshold):
        return nms_rows(*select_candidates(*args), nms_threshold, max_keep)

    static = dict(static_argnums=(7, 8))
    rows, count = jax.device_get(
        jax.jit(functools.partial(detections_native, max_keep=max_keep), **static)(
            *args, np.float32(nms_threshold)
        )
    )
    ref_rows, ref_count = jax.device_get(
        jax.jit(xla, **static)(*args, nms_threshold=np.float32(nms_threshold))
    )
    assert rows.shape == ref_rows.shape == (2, max_keep, 15)
    np.testing.assert_array_equal(count, ref_count)
    scores = np.asarray(jax.nn.softmax(conf, -1)[..., 1])
    candidates = ((scores > conf_threshold) & np.asarray(valid)).sum(1)
    for i in range(2):
        n = count[i]
        assert 0 < n <= min(max_keep, k, candidates[i])
        got, ref = rows[i, :n], ref_rows[i, :n]
        diff = float(np.abs(got - ref).max())
        print(f"image {i}: {candidates[i]} candidates, {n} kept, max |native - xla| = {diff:.3g}")
        np.testing.assert_array_equal(got[:, 4], ref[:, 4])  # scores: bit for bit
        # boxes and landmarks: XLA compiles the decode of every prior (native) and of the
        # gathered top k (xla) as different loops, which can round an element 1 ulp apart
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    if k == 300:
        assert (candidates > k).all()  # the top-k cut matters


# -- Detector ---------------------------------------------------------------------------------


def test_detector_native_matches_xla(shared, mobilenet):
    from retinaface_jax.inference.detector import Detector

    img = cv2.imread(str(shared / "data/images/biubug6_curve_test.jpg"))
    assert img is not None
    images = {
        "full 624x1024 (padded to 640x1024)": img,
        "crop 301x455 (padded to 320x480)": img[40:341, 100:555],
        "crop 320x448 (exact bucket, unmasked)": img[0:320, 64:512],
    }
    native_det = Detector(mobilenet, kernels="native", compilation_cache=False)
    xla_det = Detector(mobilenet, kernels="xla", compilation_cache=False)
    assert native_det.kernels == "native" and xla_det.kernels == "xla"
    got = native_det.detect_batch(list(images.values()))
    ref = xla_det.detect_batch(list(images.values()))
    for name, g, r in zip(images, got, ref, strict=True):
        assert len(r) > 0, f"{name}: the xla detector found no faces"
        assert len(g) == len(r), f"{name}: {len(g)} faces (native) vs {len(r)} (xla)"
        gb = np.stack([f.box for f in g])
        rb = np.stack([f.box for f in r])
        gl = np.stack([f.landmarks for f in g])
        rl = np.stack([f.landmarks for f in r])
        gs = np.array([f.score for f in g])
        rs = np.array([f.score for f in r])
        print(
            f"{name}: {len(g)} faces, max diff box {np.abs(gb - rb).max():.3g} px, "
            f"landmarks {np.abs(gl - rl).max():.3g} px, score {np.abs(gs - rs).max():.3g}"
        )
        np.testing.assert_allclose(gb, rb, rtol=0, atol=1e-3, err_msg=f"{name} boxes")
        np.testing.assert_allclose(gl, rl, rtol=0, atol=1e-3, err_msg=f"{name} landmarks")
        np.testing.assert_allclose(gs, rs, rtol=0, atol=1e-5, err_msg=f"{name} scores")


def test_detector_program_reads_uint8_images_in_the_stem_kernel(mobilenet):
    """An exact-bucket uint8 batch goes to the uint8 stem kernel (no float copy of the image); a
    padded batch subtracts the mean before masking, on XLA; a float batch uses the float stem."""
    from retinaface_jax.inference.detector import Detector

    det = Detector(mobilenet, kernels="native", compilation_cache=False)

    def targets(dtype, masked: bool) -> set[str]:
        images = np.zeros((1, 64, 96, 3), dtype)
        traced = trace_detector_program(det, images, k=100, max_keep=10, masked=masked)
        text = traced.lower().as_text()
        return set(re.findall(r"retinaface_conv\w*", text))

    assert "retinaface_conv_u8" in targets(np.uint8, masked=False)
    assert "retinaface_conv_u8" not in targets(np.uint8, masked=True)
    assert "retinaface_conv_u8" not in targets(np.float32, masked=False)
    assert "retinaface_conv_winograd" in targets(np.uint8, masked=False)


# -- choose_kernels ---------------------------------------------------------------------------


def test_choose_kernels(mobilenet):
    from retinaface_jax.inference.detector import choose_kernels

    other = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernels"):
        choose_kernels("fast", mobilenet)
    with pytest.raises(ValueError):
        choose_kernels("Native", mobilenet)
    assert choose_kernels("xla", mobilenet) == "xla"
    assert choose_kernels("xla", other) == "xla"
    with pytest.raises(RuntimeError, match="native"):
        choose_kernels("native", other)
    assert choose_kernels("native", mobilenet) == "native"
    assert jax.default_backend() == "cpu"
    assert choose_kernels("auto", mobilenet) == "native"
    assert choose_kernels("auto", other) == "xla"
