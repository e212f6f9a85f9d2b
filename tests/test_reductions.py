"""``channel_sums``: the row-grouped CPU form equals the plain per-channel sum for any height."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinaface_jax.backends.xla_cpu import reductions


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 9, 53])
@pytest.mark.parametrize("row_first", [True, False])
def test_channel_sums_match_plain_sums(h: int, row_first: bool) -> None:
    rng = np.random.default_rng(h)
    a = rng.normal(size=(2, h, 7, 5)).astype(np.float32)
    b = rng.normal(size=(2, h, 7, 5)).astype(np.float32)

    @jax.jit
    def sums(a, b):
        return reductions.channel_sums(lambda r: [a[:, r], a[:, r] * b[:, r]], h, row_first)

    got_a, got_ab = sums(a, b)
    np.testing.assert_allclose(got_a, a.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ab, (a * b).sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
    assert got_a.shape == (5,)


def test_channel_sums_keeps_trailing_axes() -> None:
    x = jnp.arange(2 * 6 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 6, 3, 4, 2)
    (got,) = reductions.channel_sums(lambda r: [x[:, r]], 6)
    np.testing.assert_allclose(got, x.sum((0, 1, 2)))


def test_channel_sums_rejects_empty_height() -> None:
    with pytest.raises(ValueError, match="h=0"):
        reductions.channel_sums(lambda r: [jnp.zeros((1, 0, 1, 1))], 0)


def test_add_bias_gradients_match_autodiff():
    """``train_layers.add_bias`` (bias gradient by ``channel_sums``) against autodiff of ``y + b``, with
    a row count that is not a multiple of the row group."""
    from retinaface_jax.backends.train_layers import add_bias

    rng = np.random.default_rng(7)
    y = jnp.asarray(rng.normal(size=(3, 11, 6, 32)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=32).astype(np.float32))

    def loss(add):
        return jax.jit(jax.value_and_grad(lambda y, b: jnp.sum(jnp.sin(add(y, b))), (0, 1)))

    (v0, g0), (v1, g1) = loss(lambda y, b: y + b)(y, b), loss(add_bias)(y, b)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_array_equal(g1[0], g0[0])
    np.testing.assert_allclose(g1[1], g0[1], rtol=1e-5, atol=1e-5)
