"""The conversion table between torch state-dict names/layouts and our NNX modules.

Attribute paths equal the original's state-dict names once ``nnx.Sequential``'s ``layers`` level is
dropped; only leaf names and layouts differ, per module type:

| module      | ours                       | torch                                   |
|-------------|----------------------------|-----------------------------------------|
| Conv2d      | kernel ``[kh,kw,in,out]``  | weight ``[out,in,kh,kw]``; bias         |
| BatchNorm2d | scale, bias, mean, var     | weight, bias, running_mean, running_var |
| Linear      | kernel ``[in,out]``        | weight ``[out,in]``; bias               |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from flax import nnx

from retinaface_jax.models.layers import BatchNorm2d, Conv2d, Linear


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _same(a: np.ndarray) -> np.ndarray:
    return a


# module type -> [(our attribute, torch leaf, torch->ours, ours->torch)]
TABLE: dict[type, list[tuple[str, str, Callable, Callable]]] = {
    Conv2d: [("kernel", "weight", _oihw_to_hwio, _hwio_to_oihw), ("bias", "bias", _same, _same)],
    BatchNorm2d: [
        ("scale", "weight", _same, _same),
        ("bias", "bias", _same, _same),
        ("mean", "running_mean", _same, _same),
        ("var", "running_var", _same, _same),
    ],
    Linear: [("kernel", "weight", _t, _t), ("bias", "bias", _same, _same)],
}


class Slot(NamedTuple):
    """One tensor: where it lives in our model and how its layout maps to torch's."""

    module: nnx.Module
    attr: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def torch_name(path: tuple) -> str:
    """Our module path -> the torch module name (``nnx.Sequential``'s ``layers`` level dropped)."""
    return ".".join(str(p) for p in path if p != "layers")


def slots(module: nnx.Module, prefix: str = "") -> Iterator[tuple[str, Slot]]:
    """``(torch_name, Slot)`` for every tensor of ``module`` (names relative to it, plus prefix)."""
    for path, sub in nnx.iter_modules(module):
        for attr, leaf, to_ours, to_torch in TABLE.get(type(sub), ()):
            if getattr(sub, attr, None) is None:
                continue
            name = ".".join(p for p in (prefix, torch_name(path), leaf) if p)
            yield name, Slot(sub, attr, to_ours, to_torch)


def export_state_dict(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The torch-layout state dict of ``module`` (numpy, without ``num_batches_tracked``)."""
    return {
        name: np.asarray(s.to_torch(np.asarray(getattr(s.module, s.attr)[...])))
        for name, s in slots(module, prefix)
    }
