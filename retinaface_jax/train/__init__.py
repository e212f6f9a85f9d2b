"""Training: schedule, optimiser, state, jitted data-parallel step, sharding, checkpoints, loop, CLI.

Entry points: ``python train.py`` (:mod:`retinaface_jax.train.cli`) and
:func:`retinaface_jax.train.loop.train`.
"""
