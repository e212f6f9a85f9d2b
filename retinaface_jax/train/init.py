"""The model a training run starts from: ImageNet backbone, full weights to fine-tune, or random.

Like the original, training starts from the ImageNet-pretrained backbone when it is given or can
be found (``mobilenetV1X0.25_pretrain.tar``; torchvision ResNet50 ``.pth``), else from random
initialisation with a warning. ``init_weights`` instead starts from complete RetinaFace weights
(an original ``.pth`` or a native checkpoint), e.g. to fine-tune the official model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flax import nnx

from retinaface_jax.config import RetinaFaceConfig

log = logging.getLogger(__name__)

BACKBONE_FILES = {
    "mobilenet0.25": ("mobilenetV1X0.25_pretrain.tar",),
    "resnet50": ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
}
NO_PRETRAINED = "none"


def backbone_search_dirs() -> list[Path]:
    """Where an ImageNet backbone is looked for, in order.

    ``./weights`` (the original's place), ``$RETINAFACE_CACHE`` (default
    ``~/.cache/retinaface_jax``) and ``$RETINAFACE_SHARED/data/weights``.
    """
    dirs = [Path("weights")]
    dirs.append(Path(os.environ.get("RETINAFACE_CACHE", Path.home() / ".cache" / "retinaface_jax")))
    if "RETINAFACE_SHARED" in os.environ:
        dirs.append(Path(os.environ["RETINAFACE_SHARED"]) / "data" / "weights")
    return dirs


def find_pretrained_backbone(cfg: RetinaFaceConfig) -> Path | None:
    """The first known ImageNet backbone file for ``cfg.backbone``, or None."""
    for d in backbone_search_dirs():
        for name in BACKBONE_FILES[cfg.backbone]:
            if (d / name).is_file():
                return d / name
    return None


def build_model(
    cfg: RetinaFaceConfig,
    *,
    seed: int = 0,
    pretrained: str | Path | None = None,
    init_weights: str | Path | None = None,
) -> tuple[nnx.Module, str]:
    """``(model, description of its initialisation)``.

    ``pretrained``: backbone file, ``'none'`` for random, or None to search for it.
    ``init_weights``: full RetinaFace weights (takes precedence over ``pretrained``).
    """
    from retinaface_jax.models.retinaface import RetinaFace
    from retinaface_jax.weights.load import load_backbone, load_model

    if init_weights is not None:
        model = load_model(str(init_weights), backbone=cfg.backbone)
        return model, f"full weights {init_weights}"
    model = RetinaFace(cfg, rngs=nnx.Rngs(seed))
    if pretrained is not None and str(pretrained).lower() == NO_PRETRAINED:
        return model, f"random (seed {seed}, --pretrained none)"
    path = Path(pretrained) if pretrained is not None else find_pretrained_backbone(cfg)
    if path is None:
        names = ", ".join(BACKBONE_FILES[cfg.backbone])
        dirs = ", ".join(str(d) for d in backbone_search_dirs())
        log.warning(
            "no ImageNet-pretrained %s backbone found (looked for %s in %s): training from random "
            "initialisation (seed %d); pass --pretrained PATH to start like the original",
            cfg.backbone,
            names,
            dirs,
            seed,
        )
        return model, f"random (seed {seed}, no pretrained backbone found)"
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such backbone file")
    load_backbone(model, str(path))
    return model, f"ImageNet backbone {path}"
