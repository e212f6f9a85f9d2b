"""retinaface_jax: RetinaFace face detection (boxes + five landmarks) in JAX / Flax NNX.

Public API (mostly imported lazily, so ``import retinaface_jax`` stays cheap):
``RetinaFace``, ``load_model``, ``load_backbone``, ``prior_box``, ``match``, ``multibox_loss``,
``Detector``, ``Face``, ``align_faces``, ``widerface_ap``, ``get_config``, ``cfg_mnet``, ``cfg_re50``,
``RetinaFaceConfig``, ``compiler_options``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RetinaFaceConfig": "retinaface_jax.config",
    "get_config": "retinaface_jax.config",
    "cfg_mnet": "retinaface_jax.config",
    "cfg_re50": "retinaface_jax.config",
    "RetinaFace": "retinaface_jax.models.retinaface",
    "load_model": "retinaface_jax.weights.load",
    "load_backbone": "retinaface_jax.weights.load",
    "Detector": "retinaface_jax.inference.detector",
    "Face": "retinaface_jax.inference.face",
    "align_faces": "retinaface_jax.inference.align",
    "widerface_ap": "retinaface_jax.evaluate.widerface_ap",
    "compiler_options": "retinaface_jax.xla_options",
}

# Functions that share their module's name are imported eagerly: importing the submodule binds the
# package attribute to the module, which would shadow a lazily exported function of the same name.
from retinaface_jax.multibox_loss import match, multibox_loss  # noqa: E402, F401
from retinaface_jax.prior_box import prior_box  # noqa: E402, F401

__all__ = sorted([*_EXPORTS, "match", "multibox_loss", "prior_box"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retinaface_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
