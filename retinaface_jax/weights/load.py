"""``load_model`` / ``load_backbone``: weights from the original's checkpoints or our own.

Sources accepted by ``load_model``:
- an original checkpoint file (``.pth``/``.tar``; legacy or zip torch format; optionally wrapped
  in ``{'state_dict': ...}`` and/or with ``module.`` prefixes), read by our torch-free reader;
- a mapping of torch state-dict names to numpy arrays (torch layout);
- a native checkpoint directory (``python -m retinaface_jax.convert``, ``save_native``);
- a training work directory (its latest checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.models.retinaface import RetinaFace, abstract_model
from retinaface_jax.weights.names import slots
from retinaface_jax.weights.torch_reader import read_state_dict

StateDict = Mapping[str, Any]


class WeightsError(ValueError):
    """Weights that do not fit the model: lists every missing/unexpected key and wrong shape."""


def infer_backbone(state_dict: StateDict, source: str = "state dict") -> str:
    """``'mobilenet0.25'`` or ``'resnet50'`` from the state-dict names (``source`` names the
    file in the error)."""
    keys = list(state_dict)
    if any(k.startswith(("body.stage1.", "stage1.")) for k in keys):
        return "mobilenet0.25"
    if any(k.startswith(("body.layer1.", "layer1.", "body.conv1.")) for k in keys):
        return "resnet50"
    raise WeightsError(
        f"{source}: cannot infer the backbone: expected keys starting with 'body.stage1.' "
        f"(mobilenet0.25) or 'body.layer1.' (resnet50); first keys are {keys[:5]}"
    )


def assign_state_dict(
    module: nnx.Module,
    state_dict: StateDict,
    *,
    prefix: str = "",
    ignore: tuple[str, ...] = (),
    source: str = "weights",
) -> None:
    """Copy torch-layout tensors into ``module``; one error lists every mismatch.

    ``prefix`` is prepended to our names (e.g. ``'body'`` to load a backbone-only state dict stored
    without it); keys starting with any of ``ignore`` are skipped (e.g. the ImageNet ``fc.``).
    """
    sd = read_state_dict(state_dict)
    table = dict(slots(module))
    full = {(f"{prefix}.{k}" if prefix else k): k for k in table}
    wanted = {name for name in sd if not name.startswith(ignore)}
    missing = sorted(n for n in full if n not in wanted)
    unexpected = sorted(n for n in wanted if n not in full)
    wrong = []
    for name in sorted(wanted & set(full)):
        slot = table[full[name]]
        ours_shape = getattr(slot.module, slot.attr).shape
        have = tuple(slot.to_torch(np.broadcast_to(np.float32(0), ours_shape)).shape)
        if tuple(sd[name].shape) != have:
            wrong.append(f"{name}: got {tuple(sd[name].shape)}, expected {have}")
    if missing or unexpected or wrong:
        parts = [f"{source} does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {wrong}")
        raise WeightsError("\n  ".join(parts))
    for name, ours in full.items():
        slot = table[ours]
        value = slot.to_ours(sd[name].astype(np.float32))
        # device_put, not jnp.asarray: outside a trace that compiles a copy program per shape
        getattr(slot.module, slot.attr).set_value(jax.device_put(np.ascontiguousarray(value)))


def load_model(
    source: str | os.PathLike | StateDict,
    backbone: str | None = None,
    cfg: RetinaFaceConfig | None = None,
) -> RetinaFace:
    """A ``RetinaFace`` with weights from ``source``, in inference mode (BatchNorm running stats).

    ``backbone`` (``'mobilenet0.25'``/``'resnet50'``) is inferred from the keys when not given;
    ``cfg`` overrides the preset of that backbone. A file that is not a readable checkpoint
    raises :class:`~retinaface_jax.weights.torch_reader.CheckpointError` and weights that do not
    fit raise :class:`WeightsError`, both naming the file.
    """
    if isinstance(source, Mapping):
        sd, label = source, "state dict"
    else:
        path = Path(source)
        if path.is_dir():
            from retinaface_jax.weights.native import load_native

            model = load_native(path, backbone=backbone, cfg=cfg)
            model.eval()
            return model
        if not path.is_file():
            raise FileNotFoundError(
                f"weights not found: {path} (expected a .pth file or a directory)"
            )
        sd, label = path, str(path)
    sd = read_state_dict(sd)
    name = backbone or (cfg.backbone if cfg is not None else infer_backbone(sd, label))
    cfg = cfg if cfg is not None else get_config(name)
    if backbone is not None and get_config(backbone).backbone != cfg.backbone:
        raise WeightsError(f"backbone {backbone!r} contradicts cfg.backbone {cfg.backbone!r}")
    model = abstract_model(cfg)  # every variable is then assigned from the state dict
    assign_state_dict(model, sd, source=label)
    model.eval()
    return model


def load_backbone(model: nnx.Module, source: str | os.PathLike | StateDict) -> nnx.Module:
    """Load an ImageNet-pretrained backbone into ``model.body`` (or into a bare backbone).

    ``source``: the original's ``mobilenetV1X0.25_pretrain.tar`` or a torchvision ResNet50 ``.pth``
    (the classifier ``fc.*`` is ignored unless the module has one). Returns ``model``.
    """
    label = "state dict" if isinstance(source, Mapping) else str(source)
    sd = read_state_dict(source)
    body = getattr(model, "body", model)
    has_fc = getattr(body, "fc", None) is not None
    assign_state_dict(body, sd, ignore=() if has_fc else ("fc.",), source=label)
    return model
