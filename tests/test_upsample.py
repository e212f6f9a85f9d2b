"""The FPN's nearest upsampling equals torch's ``F.interpolate(mode='nearest')`` index rule, in
value and gradient, whether it runs as a broadcast (integer factors) or as a gather."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retinaface_jax.models.net import upsample_nearest


def torch_rule(n_in: int, n_out: int) -> np.ndarray:
    """Source index floor(dst * (in / out)), the scale in float32 as torch computes it."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)


# (in h, in w) -> (out h, out w): 2x as at 640x640, 3x, a factor per axis, odd ratios, identity
SIZES = [
    ((40, 40), (80, 80)),
    ((3, 5), (9, 15)),
    ((4, 6), (8, 18)),
    ((5, 7), (9, 13)),
    ((20, 13), (40, 25)),
    ((6, 6), (6, 6)),
]


@pytest.mark.parametrize("src, dst", SIZES, ids=[f"{s}->{d}" for s, d in SIZES])
def test_upsample_nearest_follows_torch_in_value_and_gradient(src, dst):
    rng = np.random.default_rng(list(src + dst))
    x = jnp.asarray(rng.normal(size=(2, *src, 3)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(2, *dst, 3)).astype(np.float32))
    rows, cols = torch_rule(src[0], dst[0]), torch_rule(src[1], dst[1])

    def reference(x):
        return x[:, rows][:, :, cols]

    y, vjp = jax.vjp(lambda x: upsample_nearest(x, dst), x)
    y_ref, vjp_ref = jax.vjp(reference, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)
