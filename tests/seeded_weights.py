"""Deterministic weights by the rule in golden/README.md (the same rule the golden outputs used)."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np


def seeded_state_dict(golden_case: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Torch-layout state dict for a ``seeded_*`` golden case, generated in its ``keys`` order."""
    rng = np.random.default_rng(int(golden_case["seed"]))
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, shape_json in zip(golden_case["keys"], golden_case["shapes"]):
        key = str(key)
        shape = tuple(json.loads(str(shape_json)))
        if key.endswith(".running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".weight") and len(shape) == 1:
            value = rng.uniform(0.5, 1.0, shape)
        elif key.endswith(".running_mean") or key.endswith(".bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 1.0, shape) * np.sqrt(1.0 / np.prod(shape[1:]))
        out[key] = value.astype(np.float32)
    return out
