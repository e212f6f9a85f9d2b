"""Every CPU convolution formulation equals lax.conv in value and in both gradients: the
reference model's (``models.conv``, also in forward mode) and the CPU paths' (``conv_ops``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinaface_jax.backends.xla_cpu import conv_ops
from retinaface_jax.models import conv

CASES = {
    "dense 3x3": (3, 1, 1, 1, 32, 16),
    "dense 3x3 wide": (3, 1, 1, 1, 16, 64),
    "dense 3x3 stride 2": (3, 2, 1, 1, 32, 16),
    "narrow stem stride 2": (3, 2, 1, 1, 3, 8),
    "depthwise": (3, 1, 1, 16, 16, 16),
    "depthwise stride 2": (3, 2, 1, 16, 16, 16),
    "depthwise 5x5 stride 2 pad 1": (5, 2, 1, 8, 8, 8),
    "depthwise 8 channels (flattened rows)": (3, 1, 1, 8, 8, 8),
    "depthwise 5x5 4 channels pad 1 (flattened rows)": (5, 1, 1, 4, 4, 4),
    "1x1 stride 2": (1, 2, 0, 1, 16, 32),
    "7x7 stride 2": (7, 2, 3, 1, 32, 8),
}


@pytest.mark.parametrize("case", CASES)
def test_formulations_agree(case):
    k, stride, pad, groups, cin, cout = CASES[case]
    x = jax.random.normal(jax.random.key(1), (2, 17, 20, cin))
    w = jax.random.normal(jax.random.key(2), (k, k, cin // groups, cout))

    def run(impl):
        f = jax.jit(
            jax.value_and_grad(
                lambda x, w: jnp.sum(jnp.sin(conv_ops.conv2d(x, w, stride, pad, groups, impl))),
                argnums=(0, 1),
            )
        )
        return f(x, w)

    def forward(impl):  # not differentiated: the inference forms (custom VJP primal)
        return jax.jit(lambda x, w: conv_ops.conv2d(x, w, stride, pad, groups, impl))(x, w)

    (va, ga), (vb, gb) = run("xla"), run("taps")
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5, atol=1e-4)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    ya, yb = forward("xla"), forward("taps")
    assert ya.shape == yb.shape
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_reference_formulations_agree_in_both_modes(case):
    """``models.conv.cpu_conv2d`` (what the reference model runs on CPU) against ``lax.conv``:
    values, reverse-mode gradients and a forward-mode directional derivative."""
    k, stride, pad, groups, cin, cout = CASES[case]
    x = jax.random.normal(jax.random.key(1), (2, 17, 20, cin))
    w = jax.random.normal(jax.random.key(2), (k, k, cin // groups, cout))
    tx, tw = (
        jax.random.normal(jax.random.key(3), x.shape),
        jax.random.normal(jax.random.key(4), w.shape),
    )

    def results(fn):
        def loss(x, w):
            return jnp.sum(jnp.sin(fn(x, w, stride, pad, groups)))

        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
        _, tangent = jax.jit(lambda x, w: jax.jvp(loss, (x, w), (tx, tw)))(x, w)
        return value, grads, tangent

    (va, ga, ta), (vb, gb, tb) = results(conv.conv_xla), results(conv.cpu_conv2d)
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(ta), float(tb), rtol=1e-4, atol=1e-3)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_unknown_impl_is_refused():
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 1, 8, 8))
    with pytest.raises(ValueError, match="expected one of"):
        conv_ops.conv2d(x, w, 1, 0, 1, "fast")
