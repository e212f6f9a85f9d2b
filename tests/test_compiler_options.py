"""The CPU compiler options reach our jitted programs, and an unknown option degrades gracefully."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from program_inputs import empty_batch, trace_detector_program

import retinaface_jax
from retinaface_jax import xla_options as options_module
from retinaface_jax.config import get_config
from retinaface_jax.models.retinaface import RetinaFace
from retinaface_jax.train.optimizer import make_optimizer
from retinaface_jax.train.schedule import learning_rate_schedule
from retinaface_jax.train.sharding import make_mesh, replicate, shard_batch
from retinaface_jax.train.state import create_train_state
from retinaface_jax.train.step import make_train_step


def _conv_net(x, w):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y * y)


def test_options_per_backend():
    assert retinaface_jax.compiler_options("cpu") == options_module.CPU_OPTIONS
    assert retinaface_jax.compiler_options("gpu") is None
    assert retinaface_jax.compiler_options("tpu") is None


def test_options_remove_ynnpack_fusions_and_keep_results():
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
    grad = jax.grad(_conv_net, argnums=(0, 1))
    plain = jax.jit(grad).lower(x, w).compile()
    tuned = jax.jit(grad, compiler_options=retinaface_jax.compiler_options()).lower(x, w).compile()
    assert "__ynn_fusion" in plain.as_text()  # XLA's default on CPU: the option changes something
    assert "__ynn_fusion" not in tuned.as_text()
    for a, b in zip(plain(x, w), tuned(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)


def test_train_step_and_detector_are_compiled_with_the_options():
    cfg = get_config("mobilenet0.25", image_size=64, batch_size=2)
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    tx = make_optimizer(cfg, schedule)
    graphdef, state = create_train_state(RetinaFace(cfg, rngs=nnx.Rngs(0)), tx)
    batch = empty_batch(2, 64)
    step = make_train_step(graphdef, cfg, 64, tx, schedule, donate=False)
    assert "__ynn_fusion" not in step.lower(state, batch).compile().as_text()

    model = RetinaFace(cfg, rngs=nnx.Rngs(0))
    detector = retinaface_jax.Detector(model, cfg, compilation_cache=False)
    lowered = trace_detector_program(detector, np.zeros((1, 64, 64, 3), np.uint8)).lower()
    assert "__ynn_fusion" not in lowered.compile().as_text()


def test_data_parallel_train_step_gets_the_options_of_its_mesh_platform(monkeypatch):
    # JAX's default backend says nothing about the mesh the step runs on; the mesh's devices do
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    mesh = make_mesh(jax.devices("cpu"))
    n = mesh.devices.size
    cfg = get_config("mobilenet0.25", image_size=32, batch_size=n)
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    tx = make_optimizer(cfg, schedule)
    graphdef, state = create_train_state(RetinaFace(cfg, rngs=nnx.Rngs(0)), tx)
    batch = empty_batch(n, 32, faces=2)
    step = make_train_step(graphdef, cfg, 32, tx, schedule, mesh=mesh, donate=False)
    lowered = step.lower(replicate(state, mesh), shard_batch(batch, mesh))
    assert "__ynn_fusion" not in lowered.compile().as_text()


def test_unknown_option_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(options_module, "CPU_OPTIONS", {"xla_cpu_no_such_option_here": "1"})
    options_module._cpu_options_supported.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="xla_cpu_no_such_option_here"):
            assert options_module.compiler_options("cpu") is None
    finally:
        options_module._cpu_options_supported.cache_clear()
