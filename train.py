"""Train RetinaFace: ``python train.py --backbone mobilenet --data LABEL_TXT`` (see --help)."""

import sys

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

if __name__ == "__main__":
    reexec_with_tuned_malloc(
        huge_pages=True
    )  # XLA's per-step CPU buffers stay mapped; see the module
    from retinaface_jax.train.cli import main

    sys.exit(main())
