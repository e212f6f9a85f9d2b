"""glibc malloc settings that keep XLA's CPU buffers mapped from one train step to the next.

XLA's CPU runtime allocates a jitted program's temporary buffer on every execution (about 2 GB
for the mobilenet0.25 train step at batch 8, 640x640), from a worker thread. glibc serves such a
request with a fresh ``mmap`` and unmaps it afterwards, so each step page-faults the whole buffer
in again: ~490,000 faults per step, 2.70 -> 1.99 s/step on the 2-core CPU where this was
measured. With a single arena and mmap/trim thresholds above the buffer size, the buffer comes
from the heap and stays there.

For training, ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``huge_pages=True``; glibc >= 2.35, older
ones ignore it) also has malloc ask for transparent huge pages on that heap, where the kernel only
gives them on request (``/sys/kernel/mm/transparent_hugepage/enabled``: ``madvise``): the step's
memory-bound kernels stream tensors of 25-50 MB, and with 2 MB pages they miss the TLB far less
(185-189 against 192-195 ms per step, 3 % on the Zen 5 where this was measured). ``detect.py``
leaves it off: a short run faults in 2 MB pages it mostly does not need (its warm start: 1.07 s
with it, 1.02 s without).

The variables must be set before the process starts, so scripts re-execute themselves once with
them (``python train.py``, ``python detect.py`` and the benchmarks do).
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
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
OPT_OUT = "RETINAFACE_NO_MALLOC_TUNING"
_MARKER = "RETINAFACE_MALLOC_TUNED"
_HUGETLB = "glibc.malloc.hugetlb"


def tuned_environment(environ: dict[str, str], huge_pages: bool = False) -> dict[str, str]:
    """``environ`` with ``TUNED_ENV`` (and, with ``huge_pages``, ``HUGE_PAGES_ENV``) added. A value
    the user set is kept, except that a ``GLIBC_TUNABLES`` list that does not mention
    ``glibc.malloc.hugetlb`` gets it appended (the user's ``glibc.malloc.hugetlb=0`` turns the huge
    pages off)."""
    env = dict(environ)
    for name, value in {**TUNED_ENV, **(HUGE_PAGES_ENV if huge_pages else {})}.items():
        current = env.get(name)
        if not current:
            env[name] = value
        elif name == "GLIBC_TUNABLES" and not any(
            item.split("=", 1)[0] == _HUGETLB for item in current.split(":")
        ):
            env[name] = f"{current}:{value}"
    return env


def malloc_tuning_applies(huge_pages: bool = False) -> bool:
    """True on Linux with glibc when a tuned variable is missing and the user did not opt out."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not sys.executable:
        return False
    if os.environ.get(OPT_OUT) or os.environ.get(_MARKER):
        return False
    return tuned_environment(dict(os.environ), huge_pages) != dict(os.environ)


def reexec_with_tuned_malloc(huge_pages: bool = False) -> None:
    """Replace this process by the same command line with ``TUNED_ENV`` added (at most once; see
    :func:`tuned_environment`); ``huge_pages`` for a training process.

    Call it first thing in a script's ``__main__``. Variables the user already set are kept;
    ``RETINAFACE_NO_MALLOC_TUNING=1`` turns this off.
    """
    if not malloc_tuning_applies(huge_pages):
        return
    env = tuned_environment(dict(os.environ), huge_pages)
    env[_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
