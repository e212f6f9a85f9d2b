"""The reference model is differentiable as JAX users expect: forward mode (``jax.jvp``,
``jax.jacfwd``) and forward-over-reverse Hessian-vector products in train mode, each against
float64 central differences of the model itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retinaface_jax.models.retinaface import RetinaFace

H = 1e-6  # central-difference step: float64 rounding ~1e-16 / H, and small enough that no
# pre-activation crosses a ReLU kink (or a max-pool tie) within it: at 1e-4 and 1e-5 such
# crossings alone moved the differences by 1-5 % (measured), at 1e-6 they agree to ~2e-8


@pytest.fixture(autouse=True)
def float64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def model64(backbone: str, train: bool) -> tuple[nnx.GraphDef, dict]:
    """The model's graphdef and its state as a pure float64 dict (merged afresh inside each
    traced function, so train mode may update its running statistics there)."""
    model = RetinaFace(backbone, rngs=nnx.Rngs(3))
    if not train:
        model.eval()
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), nnx.to_pure_dict(state))


def image64(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, 40.0, shape))


def outputs(graphdef, state, x):
    """The three outputs concatenated, conf as probabilities (a smooth scalar-valued mix)."""
    loc, conf, landms = nnx.merge(graphdef, state)(x)
    return jnp.concatenate([loc, jax.nn.softmax(conf, -1), landms], -1)


def central(f, x, v):
    """``(the central difference of f at x along v, its rounding error bound)``."""
    plus, minus = f(x + H * v), f(x - H * v)
    rounding = 4 * np.finfo(np.float64).eps * float(jnp.max(jnp.abs(plus))) / H
    return (plus - minus) / (2 * H), rounding


def assert_close(got, want, rtol=1e-6, floor=0.0):
    """Within ``rtol`` of ``want``'s largest magnitude, or ``floor`` (a central difference's own
    rounding)."""
    scale = float(jnp.max(jnp.abs(want)))
    atol = max(rtol * scale, floor)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=atol)


@pytest.mark.parametrize(
    "backbone, train",
    [("mobilenet0.25", False), ("mobilenet0.25", True), ("resnet50", True)],
    ids=["mobilenet-eval", "mobilenet-train", "resnet50-train"],
)
def test_jvp_matches_central_differences(backbone, train):
    graphdef, state = model64(backbone, train)
    x = image64((2, 37, 45, 3))
    v = image64(x.shape, seed=1) / 40.0

    def f(x):
        return outputs(graphdef, state, x)

    y, tangent = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))(x, v)
    assert_close(y, jax.jit(f)(x), rtol=1e-9)
    want, rounding = central(jax.jit(f), x, v)
    assert_close(tangent, want, floor=rounding)


def test_jacfwd_matches_jacrev_and_central_differences():
    graphdef, state = model64("mobilenet0.25", train=False)
    x = image64((1, 20, 24, 3))

    def f(x):
        return outputs(graphdef, state, x).sum(axis=(0, 1))  # [16]

    forward, reverse = jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(f))(x)
    assert forward.shape == (16, *x.shape)
    assert_close(forward, reverse, rtol=1e-10)
    rng = np.random.default_rng(2)
    for _ in range(3):  # a few input directions against the model's own differences
        v = jnp.asarray(rng.normal(size=x.shape))
        want, rounding = central(jax.jit(f), x, v)
        assert_close(jnp.tensordot(forward, v, axes=4), want, floor=rounding)


def test_train_mode_hessian_vector_product_matches_central_differences():
    """d/dt grad(L)(p + t v) by forward-over-reverse equals the central difference of the
    gradient and reverse-over-reverse; train-mode BatchNorm's batch statistics are part of the
    function differentiated twice (running-average updates are not)."""
    graphdef, state = model64("mobilenet0.25", train=True)
    x = image64((2, 33, 29, 3))
    model = nnx.merge(graphdef, state)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def loss(p):
        y = nnx.merge(graphdef, p, rest)(x)
        y = jnp.concatenate([y[0], jax.nn.softmax(y[1], -1), y[2]], -1)
        return jnp.sum(jnp.sin(y))

    rng = np.random.default_rng(4)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)) * 1e-2, params)
    hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
    grad = jax.jit(jax.grad(loss))

    def directional(p):  # <grad(p), v>: its gradient is the HVP by reverse over reverse
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad(p)), jax.tree.leaves(v)))

    reverse = jax.jit(jax.grad(directional))(params)
    plus = grad(jax.tree.map(lambda a, b: a + H * b, params, v))
    minus = grad(jax.tree.map(lambda a, b: a - H * b, params, v))
    want = jax.tree.map(lambda a, b: (a - b) / (2 * H), plus, minus)
    leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    scale = max(float(jnp.max(jnp.abs(b))) for _, b in leaves)
    assert scale > 0
    for (path, w), got, rev in zip(leaves, jax.tree.leaves(hvp), jax.tree.leaves(reverse)):
        err = float(jnp.max(jnp.abs(got - w)))
        assert err <= 1e-6 * scale, (jax.tree_util.keystr(path), err, scale)
        np.testing.assert_allclose(got, rev, rtol=0, atol=1e-9 * scale)
