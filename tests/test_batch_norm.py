"""The hand-written training-mode BatchNorm backward equals autodiff of the plain formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinaface_jax.models.layers import batch_norm_train


def test_batch_norm_custom_vjp_matches_autodiff():
    """The hand-written BatchNorm backward equals autodiff of the plain formula."""

    x = jax.random.normal(jax.random.key(3), (3, 7, 5, 6)) * 2.0 + 0.5
    scale = jax.random.normal(jax.random.key(4), (6,))
    bias = jax.random.normal(jax.random.key(5), (6,))

    def plain(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    def loss(fn):
        # every output carries a cotangent, the statistics included
        def f(x, s, b):
            y, mean, var = fn(x, s, b)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    va, ga = loss(plain)(x, scale, bias)
    vb, gb = loss(lambda x, s, b: batch_norm_train(x, s, b, 1e-5))(x, scale, bias)
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_batch_norm_train_refuses_non_nhwc_input():
    with pytest.raises(ValueError, match="expected an NHWC input"):
        batch_norm_train(jnp.ones((4, 6)), jnp.ones(6), jnp.zeros(6), 1e-5)
