"""``python -m retinaface_jax.convert IN.pth OUT_DIR``: original checkpoint -> native checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from retinaface_jax.cli_errors import add_debug_flag, run_cli

PROG = "python -m retinaface_jax.convert"


def convert(argv: Sequence[str] | None = None) -> int:
    """Convert an original ``.pth`` (or a state dict in any supported form) to ``OUT_DIR``.

    Errors (unreadable or malicious checkpoint, weights that do not fit, existing OUT_DIR) are
    raised; :func:`main` reports them as one line.
    """
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("source", help="original checkpoint (.pth/.tar) or native checkpoint dir")
    p.add_argument("out_dir", help="directory to write (config.toml + Orbax state)")
    p.add_argument("--backbone", choices=["mobilenet0.25", "resnet50"], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_debug_flag(p)
    args = p.parse_args(argv)
    from retinaface_jax.weights.load import load_model  # imports JAX: after parsing
    from retinaface_jax.weights.native import save_native

    model = load_model(args.source, backbone=args.backbone)
    out = save_native(model, model.cfg, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out} ({model.cfg.backbone})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: errors as one line on stderr and a non-zero status (``--debug``, or
    ``RETINAFACE_DEBUG=1``, shows the traceback instead)."""
    return run_cli(PROG, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
