"""Images/s of the training input pipeline (decode + augment + pad + batch) per worker count.

Usage: ``python benchmarks/data_pipeline.py [--label LABEL_TXT] [--image-size 640] [--batch-size 8]
[--steps 8] [--workers 0 1 2]``. Defaults read the shared WIDER FACE train subset. The first batch
(worker start-up, ~imports) is timed separately from the steady state.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from retinaface_jax.config import get_config
from retinaface_jax.data.labels import load_records
from retinaface_jax.data.pipeline import make_train_iterator

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETINAFACE_SHARED", REPO.parent / "shared"))


def measure(
    records, cfg, *, batch_size: int, steps: int, workers: int
) -> tuple[float, float, float]:
    """(s to the first batch, steady images/s, this process's CPU ms per image) over ``steps``.

    With 0 workers the CPU time is the full loading cost per image, independent of machine load.
    """
    t0 = time.perf_counter()
    it = make_train_iterator(records, cfg, batch_size=batch_size, seed=0, num_workers=workers)
    next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    t2, c2 = time.perf_counter(), time.process_time()
    it.close()
    images = steps * batch_size
    return t1 - t0, images / (t2 - t1), 1000 * (c2 - c1) / images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default=str(SHARED / "data/widerface/train/label.txt"))
    p.add_argument("--image-size", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    records, report = load_records(args.label)
    print(report.summary())
    cfg = get_config("mobilenet", image_size=args.image_size)
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    for workers in args.workers:
        first, rate, cpu_ms = measure(
            records, cfg, batch_size=args.batch_size, steps=args.steps, workers=workers
        )
        print(
            f"workers={workers} size={args.image_size} batch={args.batch_size}: "
            f"first batch {first:.1f} s, {rate:.1f} images/s, "
            f"main-process CPU {cpu_ms:.0f} ms/image"
        )


if __name__ == "__main__":
    main()
