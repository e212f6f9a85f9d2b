"""Train RetinaFace: ``python train.py --backbone mobilenet --data LABEL_TXT`` (see --help)."""

import sys

from retinaface_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
