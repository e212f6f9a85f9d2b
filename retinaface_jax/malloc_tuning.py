"""glibc malloc settings that keep XLA's CPU buffers mapped from one train step to the next.

XLA's CPU runtime allocates a jitted program's temporary buffer on every execution (about 2 GB
for the mobilenet0.25 train step at batch 8, 640x640), from a worker thread. glibc serves such a
request with a fresh ``mmap`` and unmaps it afterwards, so each step page-faults the whole buffer
in again. With a single arena and mmap/trim thresholds above the buffer size, the buffer comes
from the heap and stays there.

For training, ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``huge_pages=True``; glibc >= 2.35, older
ones ignore it) also has malloc ask for transparent huge pages on that heap, where the kernel only
gives them on request (``/sys/kernel/mm/transparent_hugepage/enabled``: ``madvise``): the step's
memory-bound kernels stream tensors of 25-50 MB, and with 2 MB pages they miss the TLB far less.
``detect.py`` leaves it off: a short run faults in 2 MB pages it mostly does not need.

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
_HUGETLB = "glibc.malloc.hugetlb"
HUGE_PAGES_ENV = {"GLIBC_TUNABLES": f"{_HUGETLB}=1"}
OPT_OUT = "RETINAFACE_NO_MALLOC_TUNING"
_MARKER = "RETINAFACE_MALLOC_TUNED"


def tuned_environment(environ: dict[str, str], huge_pages: bool = False) -> dict[str, str]:
    """``environ`` with ``TUNED_ENV`` added (values the user set are kept) and, with
    ``huge_pages``, ``glibc.malloc.hugetlb=1`` appended to ``GLIBC_TUNABLES`` unless that list
    already names ``glibc.malloc.hugetlb`` (the user's ``=0`` turns the huge pages off)."""
    env = dict(environ)
    for name, value in TUNED_ENV.items():
        env[name] = env.get(name) or value
    if huge_pages:
        tunables = [item for item in env.get("GLIBC_TUNABLES", "").split(":") if item]
        if not any(item.split("=", 1)[0] == _HUGETLB for item in tunables):
            env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES_ENV["GLIBC_TUNABLES"]])
    return env


def _tuned_environment_to_apply(huge_pages: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None (not Linux/glibc, opted out, already done)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not sys.executable:
        return None
    if os.environ.get(OPT_OUT) or os.environ.get(_MARKER):
        return None
    env = tuned_environment(dict(os.environ), huge_pages)
    return None if env == dict(os.environ) else env


def malloc_tuning_applies(huge_pages: bool = False) -> bool:
    """True on Linux with glibc when a tuned variable is missing and the user did not opt out."""
    return _tuned_environment_to_apply(huge_pages) is not None


def reexec_with_tuned_malloc(huge_pages: bool = False) -> None:
    """Replace this process by the same command line with ``TUNED_ENV`` added (at most once; see
    :func:`tuned_environment`); ``huge_pages`` for a training process.

    Call it first thing in a script's ``__main__``. Variables the user already set are kept;
    ``RETINAFACE_NO_MALLOC_TUNING=1`` turns this off.
    """
    env = _tuned_environment_to_apply(huge_pages)
    if env is None:
        return
    env[_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
