"""``python -m retinaface_jax.convert IN.pth OUT_DIR``: original checkpoint -> native checkpoint."""

from __future__ import annotations

import argparse
import sys

from retinaface_jax.weights.load import load_model
from retinaface_jax.weights.native import save_native


def main(argv: list[str] | None = None) -> int:
    """Convert an original ``.pth`` (or a state dict in any supported form) to ``OUT_DIR``."""
    p = argparse.ArgumentParser(prog="python -m retinaface_jax.convert", description=__doc__)
    p.add_argument("source", help="original checkpoint (.pth/.tar) or native checkpoint dir")
    p.add_argument("out_dir", help="directory to write (config.toml + Orbax state)")
    p.add_argument("--backbone", choices=["mobilenet0.25", "resnet50"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = p.parse_args(argv)
    try:
        model = load_model(args.source, backbone=args.backbone)
        out = save_native(model, model.cfg, args.out_dir, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({model.cfg.backbone})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
