"""Detect faces: ``python detect.py IMAGE_OR_DIR_OR_VIDEO [...]`` (see ``--help``)."""

from retinaface_jax.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
