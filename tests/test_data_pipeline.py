"""grain pipeline: batch format, exact resume, worker-count invariance, sharding, padding."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from retinaface_jax.config import get_config
from retinaface_jax.data.labels import FaceRecord, load_records
from retinaface_jax.data.pipeline import (
    BatchIterator,
    StepBatches,
    epoch_permutation,
    make_train_iterator,
    steps_per_epoch,
)
from retinaface_jax.data.targets import DEFAULT_MAX_FACES, pad_targets, warn_crowded

CFG = get_config("mobilenet", image_size=64)


@pytest.fixture(scope="module")
def records(shared: Path) -> list[FaceRecord]:
    recs, report = load_records(shared / "data" / "widerface" / "train" / "label.txt")
    assert not report.issues
    return recs[:12]  # 12 real images: 3 steps of 4 per epoch


def _take(it, n):
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_format(records) -> None:
    (batch,) = _take(
        make_train_iterator(records, CFG, batch_size=4, seed=3, num_workers=0, max_faces=32), 1
    )
    assert set(batch) == {"image", "targets", "valid"}
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["targets"].shape == (4, 32, 15) and batch["targets"].dtype == np.float32
    assert batch["valid"].shape == (4, 32) and batch["valid"].dtype == bool
    t, v = batch["targets"], batch["valid"]
    assert np.all(t[~v] == 0)
    assert np.all(np.isin(t[v][:, 14], [1.0, -1.0]))
    assert np.all((t[v][:, :4] >= 0) & (t[v][:, :4] <= 1))
    assert v.sum() > 0 and np.all(v.sum(1) == np.cumprod(v, axis=1).sum(1))  # valid rows first


def test_resume_is_exact_across_epochs(records) -> None:
    kw = dict(batch_size=4, seed=7, num_workers=0, max_faces=64)
    full = _take(make_train_iterator(records, CFG, **kw), 7)  # epochs 0, 1 and the start of 2
    resumed = _take(make_train_iterator(records, CFG, start_step=4, **kw), 3)
    for a, b in zip(full[4:], resumed, strict=True):
        assert _equal(a, b)
    assert not _equal(full[0], full[3])  # same records in the next epoch, other order/augment
    other_seed = _take(make_train_iterator(records, CFG, **{**kw, "seed": 8}), 1)
    assert not _equal(full[0], other_seed[0])


def test_epochs_visit_each_record_once_and_drop_the_remainder() -> None:
    fn = StepBatches(
        [FaceRecord("x", np.zeros((0, 4)), np.zeros((0, 10)), np.zeros(0))] * 10,
        image_size=32,
        rgb_mean=CFG.rgb_mean,
        batch_size=4,
        seed=0,
        shard_index=0,
        shard_count=1,
        max_faces=4,
    )
    assert fn.steps_per_epoch == steps_per_epoch(10, 4) == 2
    for epoch in range(3):
        seen = np.concatenate([fn.indices(epoch * 2 + p)[1] for p in range(2)])
        assert fn.indices(epoch * 2)[0] == epoch
        assert len(set(seen.tolist())) == 8
        np.testing.assert_array_equal(seen, epoch_permutation(10, 0, epoch)[:8])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        steps_per_epoch(3, 4)


def test_shards_partition_the_global_batch(records) -> None:
    kw = dict(batch_size=4, seed=1, num_workers=0, max_faces=64, start_step=2)
    (whole,) = _take(make_train_iterator(records, CFG, **kw), 1)
    parts = [
        _take(make_train_iterator(records, CFG, shard_index=i, shard_count=2, **kw), 1)[0]
        for i in range(2)
    ]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(records, CFG, batch_size=4, seed=0, shard_count=3, num_workers=0)


def test_worker_processes_give_identical_batches(records) -> None:
    kw = dict(batch_size=4, seed=5, max_faces=64, start_step=1)
    ref = _take(make_train_iterator(records, CFG, num_workers=0, **kw), 3)
    got = _take(make_train_iterator(records, CFG, num_workers=2, prefetch=1, **kw), 3)
    for a, b in zip(ref, got, strict=True):
        assert _equal(a, b)


_EXIT_AFTER_LAST_BATCH = """
import sys
from retinaface_jax.config import get_config
from retinaface_jax.data.labels import load_records
from retinaface_jax.data.pipeline import make_train_iterator

if __name__ == "__main__":
    records, _ = load_records(sys.argv[1])
    cfg = get_config("mobilenet", image_size=64)
    with make_train_iterator(records[:12], cfg, batch_size=4, seed=0, num_steps=4) as it:
        for _ in range(4):
            next(it)
"""


def test_worker_shared_memory_is_unlinked_before_exit(shared: Path, tmp_path: Path) -> None:
    """A script that exits right after its last batch leaves no segment to the resource tracker
    (which would warn "leaked shared_memory objects"): the two workers' last batches included."""
    script = tmp_path / "exit_after_last_batch.py"
    script.write_text(_EXIT_AFTER_LAST_BATCH)
    label = shared / "data" / "widerface" / "train" / "label.txt"
    out = subprocess.run(
        [sys.executable, str(script), str(label)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "leaked" not in out.stderr, out.stderr[-2000:]


def test_close_after_grain_shut_its_deletion_pool_down(monkeypatch) -> None:
    """At interpreter shutdown grain's pool may be gone: closing must not raise over the error
    that is unwinding (a ``with`` block's)."""
    from multiprocessing.pool import ThreadPool

    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

    pool = ThreadPool(1)
    pool.terminate()
    monkeypatch.setattr(SharedMemoryArray, "_del_thread_pool", pool)
    BatchIterator(iter(())).close()


def test_pad_targets_keeps_the_largest_in_order() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.5, (10, 2))
    wh = rng.uniform(0.01, 0.4, (10, 2))
    t = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (10, 10)), np.ones((10, 1))], 1)
    padded, valid = pad_targets(t, 16)
    assert valid.tolist() == [True] * 10 + [False] * 6
    np.testing.assert_array_equal(padded[:10], t.astype(np.float32))
    assert np.all(padded[10:] == 0)
    trimmed, valid = pad_targets(t, 4)
    area = wh.prod(1)
    keep = np.sort(np.argsort(-area)[:4])
    assert valid.all()
    np.testing.assert_array_equal(trimmed, t[keep].astype(np.float32))
    empty, valid = pad_targets(np.zeros((0, 15)), 3)
    assert empty.shape == (3, 15) and not valid.any()
    assert DEFAULT_MAX_FACES == 256


def test_crowded_images_warn_once_and_missing_images_train_as_negatives(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "crowd.jpg"
    cv2.imwrite(str(path), np.full((80, 80, 3), 60, np.uint8))
    xy = np.stack(np.meshgrid(np.arange(6) * 12.0, np.arange(6) * 12.0), -1).reshape(-1, 2)
    crowd = FaceRecord(
        str(path), np.concatenate([xy, xy + 10], 1), np.zeros((36, 10)), -np.ones(36)
    )
    gone = FaceRecord(str(tmp_path / "gone.jpg"), crowd.boxes, crowd.landmarks, crowd.labels)
    with caplog.at_level(logging.WARNING):
        few = dataclasses.replace(crowd, boxes=crowd.boxes[:3], landmarks=crowd.landmarks[:3])
        assert warn_crowded([crowd, gone, few], 8) == [str(path), str(tmp_path / "gone.jpg")]
    assert sum(str(path) in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        it = make_train_iterator(
            [crowd, gone], CFG, batch_size=2, seed=0, num_workers=0, max_faces=8
        )
        batches = _take(it, 2)
    assert sum("crowd.jpg" in r.message for r in caplog.records) == 1
    assert any("gone.jpg" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    for b in batches:
        assert b["valid"].shape == (2, 8)
        assert np.all(b["valid"].sum(1) <= 8)
    # the unreadable image contributes no faces: one of the two rows of each batch is empty
    assert all((b["valid"].sum(1) == 0).sum() >= 1 for b in batches)


_PARENT_OF_A_WORKER = """
import multiprocessing, time
from retinaface_jax.data.pipeline import exit_with_parent

def work():
    exit_with_parent()
    time.sleep(120)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=work)
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_exits_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    """``exit_with_parent`` (the workers' initialiser runs it): the child of a killed parent ends
    by itself (train.py as a whole: tests/test_worker_cleanup.py)."""
    script = tmp_path / "parent.py"
    script.write_text(_PARENT_OF_A_WORKER)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the worker outlived its SIGKILLed parent by 20 s"
    finally:
        parent.stdout.close()
        if _running(child):
            os.kill(child, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited orphan that nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
