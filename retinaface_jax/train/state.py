"""Training state as one plain pytree, and the bridge between it and the NNX model.

The NNX model is split once into a static ``graphdef`` (architecture and train/eval mode) and two
pure dicts of arrays: trainable ``params`` (``nnx.Param``) and BatchNorm running statistics
(``nnx.BatchStat``). Everything that changes during training lives in :class:`TrainState`, so the
jitted step is a pure function and a checkpoint is just this pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

PyTree = Any


@struct.dataclass
class TrainState:
    """``step`` (optimiser updates done), ``params``, ``batch_stats``, ``opt_state`` and ``rng``.

    ``rng`` is raw ``uint32[2]`` key data (checkpoint-friendly); the step folds the step count into
    it so stochastic layers, if ever added, stay reproducible across resumes.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """``(graphdef, params, batch_stats)`` of ``model`` in training mode, as pure dicts.

    Raises when the model holds state other than parameters and BatchNorm statistics, since the
    step would silently drop it.
    """
    model.train()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ValueError(
            "model holds variables that are neither nnx.Param nor nnx.BatchStat "
            f"({sorted(str(p) for p, _ in nnx.to_flat_state(rest))[:5]}); the train step only "
            "carries parameters and BatchNorm statistics"
        )
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def merge_model(graphdef: nnx.GraphDef, params: PyTree, batch_stats: PyTree) -> nnx.Module:
    """The NNX model with the given parameters and statistics (in the graphdef's mode)."""
    return nnx.merge(graphdef, params, batch_stats)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` and initialise the optimiser: ``(graphdef, state at step 0)``."""
    graphdef, params, batch_stats = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, state
