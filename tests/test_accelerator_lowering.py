"""GPU and TPU programs keep XLA's own convolutions (the CPU formulations must leave them alone).

JAX lowers a program for any platform, so on this CPU machine the train step and the detector's
program are lowered for CUDA and TPU, with ``jax.default_backend()`` answering as it would on
such a machine. Neither may call our CPU kernels, and every convolution must stay a StableHLO
convolution: forward, kernel gradient and input gradient of each layer (XLA drops the stem's
unused input gradient).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from program_inputs import empty_batch, trace_detector_program

from retinaface_jax.config import get_config
from retinaface_jax.inference.detector import Detector
from retinaface_jax.models.layers import Conv2d
from retinaface_jax.models.retinaface import RetinaFace
from retinaface_jax.train.optimizer import make_optimizer
from retinaface_jax.train.schedule import learning_rate_schedule
from retinaface_jax.train.state import create_train_state
from retinaface_jax.train.step import make_train_step

# lowering platform -> what jax.default_backend() says on that machine
PLATFORMS = {"cuda": "gpu", "tpu": "tpu"}
SIZE = 64


def _custom_calls(text: str) -> list[str]:
    """Targets of the StableHLO custom calls in ``text`` (both of the syntaxes it prints)."""
    return re.findall(r"custom_call @([\w.]+)", text) + re.findall(
        r'call_target_name = "([^"]+)"', text
    )


def _model(platform: str, monkeypatch) -> tuple:
    monkeypatch.setattr(jax, "default_backend", lambda: PLATFORMS[platform])
    cfg = get_config("mobilenet0.25", image_size=SIZE, batch_size=2)
    return cfg, RetinaFace(cfg, rngs=nnx.Rngs(0))


def _forward_convolutions(model: RetinaFace, merged_heads: bool) -> int:
    """Convolutions one forward applies: every Conv2d (the reference model, which GPU/TPU train
    steps differentiate), or with a level's three heads as one (the detector's planned forward)."""
    convs = sum(isinstance(m, Conv2d) for _, m in nnx.iter_modules(model))
    return convs - 2 * 3 if merged_heads else convs


def _train_step_text(cfg, model: RetinaFace, platform: str | None = None) -> str:
    """The train step's StableHLO for a blank uint8 batch, lowered for ``platform`` (None: here)."""
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    tx = make_optimizer(cfg, schedule)
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, cfg, SIZE, tx, schedule, donate=False)
    traced = step.trace(state, empty_batch(2, SIZE, dtype=np.uint8))
    return traced.lower(lowering_platforms=(platform,) if platform else None).as_text()


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_train_step_for_accelerators_uses_xla_convolutions(platform, monkeypatch) -> None:
    cfg, model = _model(platform, monkeypatch)
    forward = _forward_convolutions(model, merged_heads=False)
    text = _train_step_text(cfg, model, platform)
    assert _custom_calls(text) == []
    assert text.count("stablehlo.convolution") == 3 * forward - 1


def test_the_same_step_on_cpu_calls_the_native_kernels() -> None:
    """The check above can fail: on the CPU the step's convolutions are our kernels."""
    from retinaface_jax.backends.native.build import native_kernels_available

    if not native_kernels_available():
        pytest.skip("the native kernels did not build here")
    cfg = get_config("mobilenet0.25", image_size=SIZE, batch_size=2)
    text = _train_step_text(cfg, RetinaFace(cfg, rngs=nnx.Rngs(0)))
    assert any(name.startswith("retinaface_") for name in _custom_calls(text))


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_detector_for_accelerators_uses_xla_convolutions(platform, monkeypatch) -> None:
    cfg, model = _model(platform, monkeypatch)
    detector = Detector(model, cfg, compilation_cache=False)
    assert detector.kernels == "xla"
    traced = trace_detector_program(detector, np.zeros((1, SIZE, SIZE, 3), np.uint8))
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert not any(name.startswith("retinaface_") for name in _custom_calls(text))
    assert text.count("stablehlo.convolution") == _forward_convolutions(model, merged_heads=True)
