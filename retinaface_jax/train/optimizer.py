"""The original optimiser as optax: torch ``SGD(lr, momentum=0.9, weight_decay=5e-4)``.

torch adds ``weight_decay * p`` to the gradient of every parameter, then keeps a momentum buffer
``b = momentum * b + g`` and steps ``p -= lr * b``. ``add_decayed_weights`` followed by
``sgd(momentum)`` (optax's ``trace`` then ``-lr`` scaling) is exactly that, including on the first
step (buffer starts at zero, so ``b = g``) and on BatchNorm scales and biases (no mask).
"""

from __future__ import annotations

import optax

from retinaface_jax.config import RetinaFaceConfig


def make_optimizer(
    cfg: RetinaFaceConfig, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformation:
    """SGD with momentum ``cfg.momentum`` and L2 ``cfg.weight_decay`` on every parameter."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(learning_rate, momentum=cfg.momentum),
    )
