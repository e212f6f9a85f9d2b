"""The original's input normalisation, in one place for the detector, the model and the train
step (numpy only, so importing it costs neither OpenCV nor JAX)."""

from __future__ import annotations

from typing import Any

import numpy as np


def subtract_mean(images: Any, rgb_mean: Any) -> Any:
    """``float32(images) - rgb_mean`` over the last (BGR) axis: the original's input
    normalisation, one float32 rounding. numpy in, numpy out; a JAX array (the detector's, the
    model's and the train step's jitted programs) stays a JAX array."""
    return images.astype(np.float32) - np.asarray(rgb_mean, dtype=np.float32)
