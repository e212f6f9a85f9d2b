"""Every CPU convolution formulation equals lax.conv in value and in both gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinaface_jax.backends.xla_cpu import conv_ops

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
        conv_ops.set_conv_impl(impl)
        try:
            f = jax.jit(
                jax.value_and_grad(
                    lambda x, w: jnp.sum(jnp.sin(conv_ops.conv2d(x, w, stride, pad, groups))),
                    argnums=(0, 1),
                )
            )
            return f(x, w)
        finally:
            conv_ops.set_conv_impl("auto")

    def forward(impl):  # not differentiated: the inference forms (custom VJP primal)
        conv_ops.set_conv_impl(impl)
        try:
            return jax.jit(lambda x, w: conv_ops.conv2d(x, w, stride, pad, groups))(x, w)
        finally:
            conv_ops.set_conv_impl("auto")

    (va, ga), (vb, gb) = run("xla"), run("taps")
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5, atol=1e-4)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    ya, yb = forward("xla"), forward("taps")
    assert ya.shape == yb.shape
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        conv_ops.set_conv_impl("fast")
