"""Learning-rate schedule of the original recipe, expressed in optimiser steps.

The original ``train.py`` multiplies the base rate by ``gamma`` at the start of epochs ``decay1``
and ``decay2`` (its ``stepvalues = (decay1 * epoch_size, decay2 * epoch_size)``), optionally after a
linear warmup from 1e-6. Here the same piecewise-constant rule is a pure function of the step count
so it can live inside the jitted step and resume exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from retinaface_jax.config import RetinaFaceConfig

WARMUP_START_LR = 1e-6  # the original's warmup starting rate


def learning_rate_schedule(
    cfg: RetinaFaceConfig, steps_per_epoch: int, lr: float | None = None
) -> optax.Schedule:
    """``step -> lr``: ``lr * gamma**k`` after k of the decay epochs, linear warmup first.

    ``lr`` overrides ``cfg.lr``; ``cfg.warmup_epochs = 0`` disables the warmup.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    base = float(cfg.lr if lr is None else lr)
    decay_steps = (cfg.decay1 * steps_per_epoch, cfg.decay2 * steps_per_epoch)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    gamma = float(cfg.gamma)

    def schedule(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step)
        num_decays = sum((step >= s).astype(jnp.int32) for s in decay_steps)
        value = base * jnp.power(gamma, num_decays.astype(jnp.float32))
        if warmup_steps > 0:
            ramp = WARMUP_START_LR + (base - WARMUP_START_LR) * step / warmup_steps
            value = jnp.where(step < warmup_steps, ramp, value)
        return value.astype(jnp.float32)

    return schedule
