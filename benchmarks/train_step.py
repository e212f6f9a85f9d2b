"""Training speed: jitted train step and data pipeline, against the ONNX anchor in the same run.

Measures, for mobilenet0.25 at 640x640:
- the ONNX reference model's forward time per image (onnxruntime, CPU), timed between the
  train steps so both sides see the same machine load: the machine's yardstick,
- compile time and steady-state time of the jitted train step at batch 8 and 32 (images/s),
  cycling through the pipeline's first real batches (``--steps`` of them at most),
- the grain data pipeline's images/s on the shared WIDER FACE train images,
and prints step-time-per-image / anchor-forward-per-image (``docs/performance.md`` has the
original PyTorch train step's, for comparison). The last line is ``ratio <number>`` (batch 8) so it can be tracked.

    python benchmarks/train_step.py [--batches 8,32] [--steps 10] [--anchor-calls 4] [--size 640]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from common import SETTLE_SECONDS, machine, onnx_anchor, shared_dir
from flax import nnx

from retinaface_jax.config import get_config
from retinaface_jax.data.labels import load_records
from retinaface_jax.data.pipeline import make_train_iterator
from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc
from retinaface_jax.models.retinaface import RetinaFace
from retinaface_jax.train.optimizer import make_optimizer
from retinaface_jax.train.schedule import learning_rate_schedule
from retinaface_jax.train.state import create_train_state
from retinaface_jax.train.step import make_train_step


def anchor_forward(shared: Path, size: int) -> Callable[[], object]:
    """A zero-argument call of the onnxruntime forward on one size x size image (warmed up)."""
    _, forward = onnx_anchor(shared)
    x = np.random.default_rng(0).normal(0, 50, (1, size, size, 3)).astype(np.float32)
    forward(x)
    return lambda: forward(x)


def pipeline_batches(
    shared: Path, cfg, batch: int, count: int, workers: int, keep: int
) -> tuple[list[dict], float]:
    """The grain pipeline's first ``keep`` real batches (``keep <= count + 1``), and its images/s
    over the ``count`` batches after the first (over 16 images the rate swung from 211 to 412
    images/s between runs, over 288 from 225 to 241)."""
    records, _ = load_records(shared / "data" / "widerface" / "train" / "label.txt")
    with make_train_iterator(
        records, cfg, batch_size=batch, seed=0, num_steps=count + 1, num_workers=workers
    ) as it:
        batches = [next(it)]
        t = time.perf_counter()
        for _ in range(count):
            b = next(it)
            if len(batches) < keep:
                batches.append(b)
        rate = batch * count / (time.perf_counter() - t)
    return batches, rate


def time_step(
    cfg, batches: list[dict], steps: int, anchor: Callable[[], object], anchor_calls: int
) -> tuple[float, list[float], list[float]]:
    """(compile seconds, seconds per step, seconds per anchor forward) of the jitted train step.

    The timed steps cycle through ``batches``, real pipeline batches: the matching's cost depends
    on a batch's faces (with XLA's loop it grows with the faces of its most crowded image, with
    the native kernel of a CPU step far less), so a single batch would not be representative.
    After every timed step the anchor forward runs ``anchor_calls`` times, so
    both sides of the ratio are measured under the same machine load (this VM's speed drifts).
    Each side starts after a ``SETTLE_SECONDS`` pause: timed right after the step, the anchor ran
    slower (XLA's threads still spinning), which flattered the ratio; onnxruntime's spinning threads likewise slow a step
    timed right after it.
    """
    schedule = learning_rate_schedule(cfg, steps_per_epoch=1000)
    tx = make_optimizer(cfg, schedule)
    model = RetinaFace(cfg, rngs=nnx.Rngs(0))
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, cfg, cfg.image_size, tx, schedule, donate=True)
    batches = [jax.device_put(b) for b in batches]
    t = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batches[0])
    jax.block_until_ready(m)
    step_times, anchor_times = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        time.sleep(SETTLE_SECONDS)
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        step_times.append(time.perf_counter() - t)
        time.sleep(SETTLE_SECONDS)
        for _ in range(anchor_calls):
            t = time.perf_counter()
            anchor()
            anchor_times.append(time.perf_counter() - t)
    if not np.isfinite(float(m["loss"])):
        raise SystemExit(f"non-finite loss {float(m['loss'])} in the benchmark step")
    return compile_s, step_times, anchor_times


def main() -> None:
    reexec_with_tuned_malloc(huge_pages=True)  # as train.py does
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--workers", type=int, default=2, help="grain worker processes")
    p.add_argument(
        "--anchor-calls", type=int, default=4, help="anchor forwards timed after each step"
    )
    args = p.parse_args()
    shared = shared_dir()
    sizes = [int(b) for b in args.batches.split(",")]
    print(machine())
    anchor = anchor_forward(shared, args.size)

    results = {}
    for b in sizes:
        cfg = get_config("mobilenet0.25", image_size=args.size, batch_size=b)
        count = max(2, 256 // b)
        batches, data_rate = pipeline_batches(
            shared, cfg, b, count, args.workers, keep=min(args.steps, count + 1)
        )
        faces = max(int(x["valid"].sum(axis=1).max()) for x in batches)
        compile_s, step_times, anchor_times = time_step(
            cfg, batches, args.steps, anchor, args.anchor_calls
        )
        step_s, anchor_s = statistics.median(step_times), statistics.median(anchor_times)
        results[b] = (step_s, anchor_s)
        print(
            f"batch {b}: data pipeline {data_rate:.1f} images/s ({args.workers} workers); "
            f"train step compile {compile_s:.1f} s, {step_s:.2f} s/step = {b / step_s:.2f} "
            f"images/s (data keeps up: {data_rate >= b / step_s}; {len(batches)} real batches "
            f"in turn, up to {faces} faces in an image)"
        )
        print(
            f"batch {b}: anchor forward (onnxruntime, {args.size}x{args.size}) between the steps: "
            f"{anchor_s * 1e3:.1f} ms/image (median of {len(anchor_times)})"
        )
    for b, (step_s, anchor_s) in results.items():
        print(
            f"batch {b}: {step_s / b * 1e3:.0f} ms/image = {step_s / b / anchor_s:.2f} "
            "anchor forwards"
        )
    key = 8 if 8 in results else sizes[0]
    step_s, anchor_s = results[key]
    print(f"ratio {step_s / key / anchor_s:.3f}")


if __name__ == "__main__":
    main()
