"""retinaface_jax: RetinaFace face detection (boxes + five landmarks) in JAX / Flax NNX.

Public API (imported lazily on first use, so ``import retinaface_jax`` does not import JAX: scripts
can re-execute themselves with tuned malloc settings, ``malloc_tuning``, before paying for it):
``RetinaFace``, ``load_model``, ``load_backbone``, ``prior_box``, ``match``, ``multibox_loss``,
``Detector``, ``Face``, ``FaceTracker``, ``align_faces``, ``anonymize``, ``widerface_ap``,
``get_config``, ``cfg_mnet``, ``cfg_re50``, ``RetinaFaceConfig``, ``compiler_options``,
``export_onnx`` (needs the ``[export]`` extra).
"""

from __future__ import annotations

from retinaface_jax.lazy_exports import lazy_exports

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
    "FaceTracker": "retinaface_jax.inference.tracking",
    "align_faces": "retinaface_jax.inference.align",
    "anonymize": "retinaface_jax.inference.anonymize",
    "widerface_ap": "retinaface_jax.evaluate.widerface_ap",
    "compiler_options": "retinaface_jax.xla_options",
    "match": "retinaface_jax.loss",
    "multibox_loss": "retinaface_jax.loss",
    "prior_box": "retinaface_jax.priors",
    "export_onnx": "retinaface_jax.export.onnx_export",  # needs the [export] extra (onnx)
}
# No export may share its module's name: importing a submodule binds the package attribute to the
# module, which would shadow the lazily exported object of the same name.

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
