"""Evaluation: the official WIDER FACE val AP (vectorised), FDDB detection files and a discrete ROC,
PR/ROC plots, and ``python -m retinaface_jax.evaluate widerface|fddb``.

Modules: ``widerface_gt`` (official .mat ground truth), ``predictions_io`` (per-image txt files),
``widerface_ap`` (``widerface_ap``, ``evaluate_widerface``), ``matching`` (IoU, first-hit rule),
``fddb``, ``plot``, ``run`` (detector over an image set), ``__main__`` (CLI).
"""
