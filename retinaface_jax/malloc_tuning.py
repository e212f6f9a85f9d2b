"""glibc malloc settings that keep XLA's CPU buffers mapped from one train step to the next.

XLA's CPU runtime allocates a jitted program's temporary buffer on every execution (about 2 GB
for the mobilenet0.25 train step at batch 8, 640x640), from a worker thread. glibc serves such a
request with a fresh ``mmap`` and unmaps it afterwards, so each step page-faults the whole buffer
in again: ~490,000 faults per step, 2.70 -> 1.99 s/step on the 2-core CPU where this was
measured. With a single arena and mmap/trim thresholds above the buffer size, the buffer comes
from the heap and stays there. The variables must be set before the process starts, so scripts
re-execute themselves once with them (``python train.py`` and the training benchmark do).
"""

from __future__ import annotations

import os
import platform
import sys

TUNED_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 36),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}
OPT_OUT = "RETINAFACE_NO_MALLOC_TUNING"
_MARKER = "RETINAFACE_MALLOC_TUNED"


def malloc_tuning_applies() -> bool:
    """True on Linux with glibc when the tuned variables are missing and the user did not opt out."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not sys.executable:
        return False
    if os.environ.get(OPT_OUT) or os.environ.get(_MARKER):
        return False
    return any(name not in os.environ for name in TUNED_ENV)


def reexec_with_tuned_malloc() -> None:
    """Replace this process by the same command line with ``TUNED_ENV`` added (at most once).

    Call it first thing in a script's ``__main__``. Variables the user already set are kept;
    ``RETINAFACE_NO_MALLOC_TUNING=1`` turns this off.
    """
    if not malloc_tuning_applies():
        return
    env = dict(os.environ)
    for name, value in TUNED_ENV.items():
        env.setdefault(name, value)
    env[_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
