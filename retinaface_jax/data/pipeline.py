"""grain input pipeline for training: shuffled, sharded, augmented, padded batches with exact resume.

The pipeline is a function of the global step. For step ``s`` with ``n = steps_per_epoch``:
epoch ``e = s // n``; the epoch's permutation of the records comes from ``(seed, e)``; the global
batch is slice ``s % n`` of it (the remainder of an epoch is dropped); process ``shard_index`` of
``shard_count`` takes its contiguous ``batch_size // shard_count`` part; each example is augmented
with a Generator seeded by ``(seed, e, record index)``. Nothing depends on iteration history or on
the number of worker processes, so starting at ``start_step=k`` yields exactly batches k, k+1, ...
of an uninterrupted run.

Batch format (consumed by the train step)::

    {'image':   uint8   [b, S, S, 3]   NHWC, BGR (the train step subtracts cfg.rgb_mean),
     'targets': float32 [b, M, 15]     x1,y1,x2,y2, 10 landmark coords (normalised), label 1 / -1;
                                       padded rows are zero,
     'valid':   bool    [b, M]}

with ``b = batch_size // shard_count`` (this process's part of the global batch), ``S`` the
training size and ``M = max_faces``.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import grain
import numpy as np
from absl import flags

from retinaface_jax.config import RetinaFaceConfig
from retinaface_jax.data.augment import augment
from retinaface_jax.data.labels import FaceRecord
from retinaface_jax.data.targets import DEFAULT_MAX_FACES, pad_targets, warn_crowded

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
# exit status of a data-loader worker that ended because its parent process died
EXIT_PARENT_GONE = 3


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped, like drop_last=True)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = num_records // batch_size
    if steps == 0:
        raise ValueError(
            f"{num_records} training images are fewer than one global batch of {batch_size}"
        )
    return steps


def epoch_permutation(num_records: int, seed: int, epoch: int) -> np.ndarray:
    """The record order of one epoch: a permutation determined by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def load_image(record: FaceRecord) -> tuple[np.ndarray, bool]:
    """(BGR uint8 image, ok). An image that cannot be read at training time is logged and replaced
    by a mid-grey image so the run goes on (its faces are then not used)."""
    image = cv2.imread(record.path, cv2.IMREAD_COLOR) if Path(record.path).is_file() else None
    if image is not None:
        return image, True
    log.error("cannot read image %s: using a blank negative sample instead", record.path)
    height, width = record.size or (640, 640)
    return np.full((height, width, 3), 128, np.uint8), False


def make_example(
    record: FaceRecord,
    *,
    index: int,
    epoch: int,
    seed: int,
    image_size: int,
    rgb_mean: tuple[float, float, float],
    max_faces: int,
) -> Batch:
    """One augmented, padded example of record ``index`` in ``epoch`` (deterministic)."""
    rng = np.random.default_rng([seed, epoch, index])
    image, ok = load_image(record)
    n = record.num_faces if ok else 0
    image, targets = augment(
        image,
        record.boxes[:n],
        record.landmarks[:n],
        record.labels[:n],
        image_size=image_size,
        rgb_mean=rgb_mean,
        rng=rng,
    )
    padded, valid = pad_targets(targets, max_faces)
    return {"image": image, "targets": padded, "valid": valid}


class StepBatches:
    """Picklable map ``global step -> this process's batch`` (what grain runs in its workers)."""

    def __init__(
        self,
        records: Sequence[FaceRecord],
        *,
        image_size: int,
        rgb_mean: tuple[float, float, float],
        batch_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        max_faces: int,
    ) -> None:
        if shard_count <= 0 or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
        if batch_size % shard_count:
            raise ValueError(
                f"global batch_size={batch_size} must be divisible by shard_count={shard_count}"
            )
        self.records = list(records)
        self.image_size = int(image_size)
        self.rgb_mean = tuple(float(m) for m in rgb_mean)
        self.batch_size = batch_size
        self.local_batch = batch_size // shard_count
        self.seed = seed
        self.shard_index = shard_index
        self.max_faces = max_faces
        self.steps_per_epoch = steps_per_epoch(len(self.records), batch_size)
        self._perm_epoch = -1
        self._perm = np.zeros(0, np.int64)

    def indices(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, record indices of this process's part of the global batch at ``step``)."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(len(self.records), self.seed, epoch)
            self._perm_epoch = epoch
        start = pos * self.batch_size + self.shard_index * self.local_batch
        return epoch, self._perm[start : start + self.local_batch]

    def __call__(self, step: int) -> Batch:
        epoch, indices = self.indices(step)
        examples = [
            make_example(
                self.records[i],
                index=int(i),
                epoch=epoch,
                seed=self.seed,
                image_size=self.image_size,
                rgb_mean=self.rgb_mean,
                max_faces=self.max_faces,
            )
            for i in indices
        ]
        return {k: np.stack([e[k] for e in examples]) for k in ("image", "targets", "valid")}


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Each grain worker is one process: keep OpenCV single-threaded to avoid oversubscription,
    and end the worker with its parent."""
    del worker_index, worker_count
    cv2.setNumThreads(1)
    exit_with_parent()


def exit_with_parent() -> None:
    """In a multiprocessing child: end this process as soon as its parent has died.

    A grain worker whose training process was SIGKILLed (the OOM killer) blocks forever on its
    full output queue, holding its memory and keeping multiprocessing's resource tracker alive:
    the tracker unlinks the run's leftover shared memory and semaphores (``/dev/shm``) only once
    every process holding its pipe has exited. The parent's sentinel, a pipe whose write end
    only the parent holds, turns readable when the parent dies; a daemon thread waits on it
    (no polling, any platform, no race: a parent already gone returns at once).
    ``prctl(PR_SET_PDEATHSIG)`` is not used: it fires when the parent *thread* that started the
    worker ends, and grain starts its workers from a thread pool.
    """
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child (e.g. num_workers=0): nothing to watch
        return
    threading.Thread(
        target=_exit_when_gone, args=(parent,), name="exit-with-parent", daemon=True
    ).start()


def _exit_when_gone(parent: multiprocessing.process.BaseProcess) -> None:
    """Wait for ``parent`` to die, then exit at once (no cleanup that could block)."""
    parent.join()
    os._exit(EXIT_PARENT_GONE)


def make_train_dataset(
    records: Sequence[FaceRecord],
    cfg: RetinaFaceConfig,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    max_faces: int = DEFAULT_MAX_FACES,
) -> grain.MapDataset:
    """A ``grain.MapDataset`` whose element ``i`` is this process's batch of step ``start_step+i``.

    ``batch_size`` is the GLOBAL batch size; ``num_steps`` (total steps of the run, default
    ``cfg.epochs * steps_per_epoch``) bounds the dataset. Image size and mean come from ``cfg``.
    """
    fn = StepBatches(
        records,
        image_size=cfg.image_size,
        rgb_mean=cfg.rgb_mean,
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        shard_count=shard_count,
        max_faces=max_faces,
    )
    if num_steps is None:
        num_steps = cfg.epochs * fn.steps_per_epoch
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step={start_step} must be in [0, num_steps={num_steps}]")
    return grain.MapDataset.range(start_step, num_steps).map(fn)


def make_train_iterator(
    records: Sequence[FaceRecord],
    cfg: RetinaFaceConfig,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 2,
    prefetch: int = 2,
    max_faces: int = DEFAULT_MAX_FACES,
) -> BatchIterator:
    """Batches for global steps ``start_step, start_step+1, ...`` (see the module docstring).

    ``num_workers`` grain worker processes (0: load in this process with one prefetch thread)
    each keep ``prefetch`` batches ready. The result is identical for any ``num_workers`` and for
    any resume point. Call ``.close()`` on the returned iterator (or let it be collected) to stop
    the workers. Warns once for each image with more than ``max_faces`` faces.
    """
    warn_crowded(records, max_faces)
    ds = make_train_dataset(
        records,
        cfg,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        num_steps=num_steps,
        shard_index=shard_index,
        shard_count=shard_count,
        max_faces=max_faces,
    )
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, prefetch))
    it_ds: Any = ds.to_iter_dataset(read)
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's multiprocess prefetch reads absl flags; outside absl.app they are unparsed
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=_init_worker,
        )
    return BatchIterator(iter(it_ds))


class BatchIterator(Iterator[Batch]):
    """Batches as plain numpy arrays; ``close()`` (or ``with``) stops the grain workers.

    Worker outputs live in shared memory owned by grain; copying them out (one memcpy per batch)
    frees each segment at once instead of whenever the consumer drops its last reference.
    """

    def __init__(self, it: Iterator[Batch]) -> None:
        self._it = it

    def __next__(self) -> Batch:
        batch = next(self._it)
        return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = iter(())
        _release_shared_memory()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_shared_memory() -> None:
    """Unlink the shared memory of every batch already consumed, before returning.

    grain unlinks a worker's output segment when the consumer's array is deleted, on a pool of
    daemon threads. Its closed iterators still hold their last batches in reference cycles, and
    a script that exits right after its last batch leaves those segments to multiprocessing's
    resource tracker, which removes them and warns "There appear to be N leaked shared_memory
    objects" (7 of 10 two-worker ``train.py`` runs here ended so). So: collect the cycles (the
    caller has dropped the iterators), then wait for the pool. It has one thread and runs
    requests in order, so a no-op put through it returns once the earlier unlinks are done. The
    pool is grain's private attribute; a grain version without it has nothing to wait for.
    """
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is None:  # no worker has run in this process: no shared memory to release
        return
    gc.collect()
    try:
        pool.apply(int)
    except ValueError:  # "Pool not running": shut down already, nothing left to wait for
        pass
