"""RetinaFace configuration: one frozen dataclass, presets read from ``configs/*.toml``.

The presets equal the original's ``cfg_mnet`` / ``cfg_re50`` plus the constants the original
hard-codes in its scripts (loss thresholds, optimiser, detection thresholds), so every constant has
exactly one source of truth.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BACKBONES = ("mobilenet0.25", "resnet50")
_ALIASES = {
    "mobilenet0.25": "mobilenet0.25",
    "mobilenet": "mobilenet0.25",
    "mnet": "mobilenet0.25",
    "resnet50": "resnet50",
    "resnet": "resnet50",
    "re50": "resnet50",
}


def canonical_backbone(name: str) -> str | None:
    """``'mobilenet0.25'`` or ``'resnet50'`` for any accepted alias (``'mobilenet'``, ``'re50'``...), else None."""
    return _ALIASES.get(str(name).lower())


@dataclasses.dataclass(frozen=True)
class RetinaFaceConfig:
    """Everything that defines a RetinaFace model, its priors, loss, training recipe and detection."""

    name: str
    backbone: str
    return_layers: tuple[str, ...]
    in_channel: int
    out_channel: int
    anchor_num: int
    min_sizes: tuple[tuple[int, ...], ...]
    steps: tuple[int, ...]
    variance: tuple[float, float]
    clip: bool
    rgb_mean: tuple[float, float, float]
    num_classes: int
    overlap_threshold: float
    neg_pos_ratio: int
    loc_weight: float
    image_size: int
    batch_size: int
    epochs: int
    decay1: int
    decay2: int
    lr: float
    momentum: float
    weight_decay: float
    gamma: float
    warmup_epochs: int
    bn_momentum: float
    conf_threshold: float
    nms_threshold: float
    top_k: int
    keep_top_k: int
    vis_threshold: float

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"config field 'backbone': expected one of {BACKBONES}, got {self.backbone!r}"
            )
        if len(self.min_sizes) != len(self.steps):
            raise ValueError(
                "config fields 'min_sizes' and 'steps' must have one entry per FPN level"
            )

    def replace(self, **changes: Any) -> RetinaFaceConfig:
        """A copy with some fields changed (validated like a fresh config)."""
        return from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/TOML-serialisable dict."""
        out = dataclasses.asdict(self)
        return {k: _to_lists(v) for k, v in out.items()}


def _to_lists(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_to_lists(x) for x in v]
    return v


def _to_tuples(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_to_tuples(x) for x in v)
    return v


def from_dict(d: Mapping[str, Any], source: str = "config") -> RetinaFaceConfig:
    """Build a config from a mapping; unknown or missing fields give one clear error."""
    fields = {f.name: f for f in dataclasses.fields(RetinaFaceConfig)}
    unknown = sorted(set(d) - set(fields))
    missing = sorted(set(fields) - set(d))
    if unknown or missing:
        raise ValueError(f"{source}: unknown fields {unknown}, missing fields {missing}")
    kwargs = {k: _to_tuples(v) for k, v in d.items()}
    for k in ("steps", "return_layers"):
        kwargs[k] = tuple(kwargs[k])
    return RetinaFaceConfig(**kwargs)


def _preset_file(backbone: str) -> Any:
    return importlib.resources.files("retinaface_jax.configs").joinpath(f"{backbone}.toml")


def get_config(name_or_path: str | Path = "mobilenet0.25", **overrides: Any) -> RetinaFaceConfig:
    """A preset by backbone name (``'mobilenet0.25'``/``'mobilenet'``, ``'resnet50'``) or a TOML file.

    Keyword overrides replace fields, e.g. ``get_config('mobilenet', image_size=320)``.
    """
    key = str(name_or_path).lower()
    if key in _ALIASES:
        source = _preset_file(_ALIASES[key])
        label = f"preset {_ALIASES[key]}"
    else:
        source = Path(name_or_path)
        label = str(source)
        if not source.is_file():
            raise ValueError(
                f"unknown config {name_or_path!r}: expected one of {sorted(_ALIASES)} or a TOML file"
            )
    with source.open("rb") as f:
        data = tomllib.load(f)
    return from_dict({**data, **overrides}, source=label)


def dump_config(cfg: RetinaFaceConfig) -> str:
    """TOML text for ``cfg`` (flat keys, ints, floats, bools, strings and nested lists only)."""
    lines = []
    for k, v in cfg.to_dict().items():
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


cfg_mnet: RetinaFaceConfig = get_config("mobilenet0.25")
cfg_re50: RetinaFaceConfig = get_config("resnet50")
