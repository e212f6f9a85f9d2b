"""Shared benchmark plumbing: locating ../shared, the ONNX anchor, timing, machine description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$RETINAFACE_SHARED`` or ``../shared`` beside the repository (must exist)."""
    root = Path(os.environ.get("RETINAFACE_SHARED", REPO.parent / "shared"))
    if not (root / "anchors").is_dir():
        raise SystemExit(f"shared data not found at {root}: set RETINAFACE_SHARED")
    return root


def machine() -> str:
    """One line naming the machine the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    from retinaface_jax.malloc_tuning import TUNED_ENV

    tuned = "on" if all(name in os.environ for name in TUNED_ENV) else "off"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (
        f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), malloc tuning {tuned}"
        f"{f' (GLIBC_TUNABLES={tunables})' if tunables else ''}"
    )


def pin_cpus(n: int | None) -> int:
    """Restrict this process to its first ``n`` allowed CPUs (before JAX starts); the CPU count.

    XLA sizes its thread pool from the affinity mask, so ``pin_cpus(1)`` with a one-thread anchor
    (``onnx_anchor(..., threads=1)``) compares both sides per core.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if n is not None:
        if not 1 <= n <= len(cpus):
            raise SystemExit(f"--cpus: expected 1..{len(cpus)}, got {n}")
        cpus = cpus[:n]
        os.sched_setaffinity(0, cpus)
    return len(cpus)


def onnx_anchor(shared: Path, threads: int | None = None):
    """An onnxruntime session of the original model (the speed anchor) and a run function.

    ``threads``: onnxruntime's intra-op threads (default: its own choice, one per core).
    """
    import onnxruntime as ort

    path = shared / "anchors/retinaface_mobilenet0.25_reference.onnx"
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(x_nhwc: np.ndarray):
        return session.run(None, {"input": np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))})

    return session, forward


def best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> float:
    """Median seconds per call over ``repeats`` calls (at least ``min_seconds`` of calls)."""
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def warm_up(fns: dict[str, Callable[[], object]], seconds: float = 2.0, calls: int = 5) -> None:
    """Call the functions in turn for at least ``seconds`` and ``calls`` rounds.

    The first calls after compiling (or loading from the compilation cache) run slower for a while
    (allocator growth, first-touch page faults, caches); a few warm-up calls alone leave the
    ratios of repeated runs scattered.
    """
    start, rounds = time.perf_counter(), 0
    while rounds < calls or time.perf_counter() - start < seconds:
        for fn in fns.values():
            fn()
        rounds += 1


# Seconds to wait before timing one side after the other ran: onnxruntime's and XLA's worker
# threads keep spinning for a while after a run and slow whatever runs next on this 2-core machine.
SETTLE_SECONDS = 0.2


def alternating_medians(
    fns: dict[str, Callable[[], object]],
    calls: int,
    block: int = 10,
    settle: float = SETTLE_SECONDS,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating blocks of ``block`` calls.

    Both sides of a ratio then see the same background load (this shared machine drifts by tens
    of percent within minutes). Blocks with a ``settle`` pause before each, not call-by-call
    interleaving: onnxruntime's worker threads keep spinning after a run and slow whatever runs
    next.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, -(-calls // block))):
        for name, fn in fns.items():
            time.sleep(settle)
            times[name] += [best_time(fn, 1) for _ in range(block)]
    return {name: float(np.median(t)) for name, t in times.items()}
