"""Train RetinaFace: ``python train.py --backbone mobilenet --data LABEL_TXT`` (see --help)."""

import sys

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

if __name__ == "__main__":
    # XLA's per-step CPU buffers stay mapped, on huge pages; see the module
    reexec_with_tuned_malloc(huge_pages=True)
    from retinaface_jax.train.cli import main

    sys.exit(main())
