"""The hand-written training-mode BatchNorm (+ LeakyReLU) backward equals autodiff of the plain
formula, and the planned conv blocks' fused BatchNorm -> activation pairs equal the reference
layers one by one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retinaface_jax.backends.planned_forward import conv_block
from retinaface_jax.backends.train_layers import batch_norm_train
from retinaface_jax.models.net import SSH, conv_dw


def plain_leaky(z, slope):
    """The activation as autodiff sees it, with torch's subgradient at 0 (the slope)."""
    return jnp.where(z > 0, z, z * slope)


@pytest.mark.parametrize("slope", [1.0, 0.1, 0.0], ids=["none", "leaky", "relu"])
def test_batch_norm_custom_vjp_matches_autodiff(slope):
    """The hand-written backward (activation mask recomputed from x) equals autodiff."""

    x = jax.random.normal(jax.random.key(3), (3, 7, 5, 6)) * 2.0 + 0.5
    scale = jax.random.normal(jax.random.key(4), (6,))
    bias = jax.random.normal(jax.random.key(5), (6,))

    def plain(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        z = (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
        return plain_leaky(z, slope), mean, var

    def loss(fn):
        # every output carries a cotangent, the statistics included
        def f(x, s, b):
            y, mean, var = fn(x, s, b)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    va, ga = loss(plain)(x, scale, bias)
    vb, gb = loss(lambda x, s, b: batch_norm_train(x, s, b, 1e-5, slope))(x, scale, bias)
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_batch_norm_train_refuses_non_nhwc_input():
    with pytest.raises(ValueError, match="expected an NHWC input"):
        batch_norm_train(jnp.ones((4, 6)), jnp.ones(6), jnp.zeros(6), 1e-5)


def unfused(block, x, activation=None):
    """The reference: the block's layers one by one (nnx.Sequential's call), then the activation."""
    y = block(x)
    return y if activation is None else plain_leaky(y, activation)


@pytest.mark.parametrize("case", ["conv_dw", "ssh_branch"])
def test_conv_block_fuses_batch_norm_and_activation_(case):
    """In training, values, gradients and updated batch statistics of a block with its
    BatchNorm -> LeakyReLU pairs fused equal those of the layers run one by one."""
    rngs = nnx.Rngs(0)
    if case == "conv_dw":
        block, activation, c = conv_dw(8, 16, 1, rngs=rngs), None, 8
    else:  # SSH.conv3X3: BatchNorm with no activation of its own, then SSH's ReLU
        block, activation, c = SSH(16, 16, rngs=rngs).conv3X3, 0.0, 16
    x = jax.random.normal(jax.random.key(1), (2, 9, 7, c))
    graphdef, state = nnx.split(block)

    def run(call):
        def loss(state, x):
            module = nnx.merge(graphdef, state)
            y = call(module, x)
            return jnp.sum(jnp.sin(3 * y)), (y, nnx.state(module, nnx.BatchStat))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)

    (va, (ya, sa)), ga = run(lambda m, x: conv_block(m, x, None, activation))
    (vb, (yb, sb)), gb = run(lambda m, x: unfused(m, x, activation))
    np.testing.assert_allclose(ya, yb, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves((sa, ga)), jax.tree.leaves((sb, gb)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_second_order_through_the_custom_batch_norm_raises():
    """Its backward treats the batch statistics as constants, so grad-of-grad would be wrong:
    it raises instead (the reference model is differentiable to any order)."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 4, 3))
    scale, bias = jnp.ones(3), jnp.zeros(3)

    def first(x):
        return jnp.sum(jnp.sin(batch_norm_train(x, scale, bias, 1e-5, 0.1)[0]))

    jax.grad(first)(x)  # first order: fine
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        jax.grad(lambda x: jnp.sum(jax.grad(first)(x) ** 2))(x)
