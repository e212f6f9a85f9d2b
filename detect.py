"""Detect faces: ``python detect.py IMAGE_OR_DIR_OR_VIDEO [...]`` (see ``--help``)."""

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

if __name__ == "__main__":
    reexec_with_tuned_malloc()  # keeps XLA's CPU buffers mapped between calls; see the module
    from retinaface_jax.inference.cli import main

    raise SystemExit(main())
