"""A model as a flat list of arrays plus a function that rebuilds it: the cheapest jit argument.

Calling a jitted function with an ``nnx.Module`` flattens its object graph on every call, which
is costly; its ``nnx.State`` costs less and a list of arrays least. Split once, pass the leaves, rebuild inside the jitted function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx


def flat_state(model: nnx.Module) -> tuple[list[jax.Array], Callable[[Sequence], nnx.Module]]:
    """``(leaves, rebuild)``: the model state's flat leaves and ``rebuild(leaves) -> model``."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def rebuild(new_leaves: Sequence) -> nnx.Module:
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(new_leaves)))

    return leaves, rebuild
