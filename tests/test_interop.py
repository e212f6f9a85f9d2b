"""Using retinaface_jax pieces from other JAX code: NNX composition, pure functions, Linen."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import bridge

from retinaface_jax import RetinaFace, get_config
from retinaface_jax.models.net import FPN, SSH, MobileNetV1

X = jnp.asarray(np.random.default_rng(0).normal(0, 1, (2, 64, 64, 3)), jnp.float32)


class FaceQualityNet(nnx.Module):
    """Another project's model that reuses our backbone and context modules."""

    def __init__(self, rngs: nnx.Rngs):
        self.backbone = MobileNetV1(rngs=rngs)
        self.fpn = FPN([64, 128, 256], 64, rngs=rngs)
        self.context = SSH(64, 64, rngs=rngs)
        self.score = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        p3 = self.context(self.fpn(self.backbone.features(x))[0])
        return self.score(jnp.mean(p3, axis=(1, 2)))[:, 0]


def test_backbone_inside_another_nnx_model_trains():
    model = FaceQualityNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, __import__("optax").sgd(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(m):
            return jnp.mean(jnp.square(m(x) - 1.0))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, X)) for _ in range(3)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    # BatchNorm statistics moved in training mode
    assert not np.allclose(np.asarray(model.backbone.stage1.layers[0].layers[1].mean[...]), 0)


def test_pure_pytree_and_apply_function():
    model = RetinaFace(get_config("mobilenet0.25"))
    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    pure_params = nnx.to_pure_dict(params)  # plain nested dict of arrays
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(pure_params))

    @jax.jit
    def apply(p, x):
        nnx.replace_by_pure_dict(params, p)
        loc, conf, landms = nnx.merge(graphdef, params, stats)(x)
        return loc, conf, landms

    loc, conf, landms = apply(pure_params, X)
    ref = model(X)
    np.testing.assert_allclose(np.asarray(loc), np.asarray(ref[0]), atol=1e-5)

    grads = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x)[1] ** 2)))(pure_params, X)
    assert jax.tree.structure(grads) == jax.tree.structure(pure_params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_from_linen_through_bridge():
    cfg = get_config("mobilenet0.25")

    class LinenDetector(nn.Module):
        @nn.compact
        def __call__(self, x):
            loc, conf, landms = bridge.to_linen(RetinaFace, cfg)(x)
            return jax.nn.softmax(conf, -1)

    module = LinenDetector()
    variables = module.init(jax.random.key(0), X)
    assert set(variables) >= {"params", "batch_stats"}
    out, updates = module.apply(variables, X, mutable=["batch_stats"])
    assert out.shape == (2, 168, 2)
    np.testing.assert_allclose(np.asarray(out.sum(-1)), 1.0, atol=1e-5)
