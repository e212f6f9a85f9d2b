"""A SIGKILLed ``train.py`` (the OOM killer) leaves no data-loader process and no ``/dev/shm`` entry.

The real ``train.py`` runs on a small synthetic WIDER FACE layout with two grain workers; once the
workers are producing batches, only the main process is killed. Its children (the workers and
multiprocessing's resource tracker) must exit on their own within ``EXIT_TIMEOUT_S``, and the
shared memory segments and semaphores of the run must be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
START_TIMEOUT_S = 120
EXIT_TIMEOUT_S = 20
WORKERS = 2

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not SHM.is_dir(), reason="needs Linux /proc, /dev/shm"
)


def _write_dataset(root: Path, n: int = 16) -> Path:
    """``root/label.txt`` + ``root/images/<event>/<name>.jpg``: one face with landmarks each."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"0--Synthetic/synthetic_{i}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 255, (96, 128, 3), np.uint8))
        lines += [f"# {name}", "20 20 40 40 30 35 0 50 35 0 40 45 0 32 52 0 48 52 0 1"]
    (root / "label.txt").write_text("\n".join(lines) + "\n")
    return root / "label.txt"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a live process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: it waits only for whoever adopted it to reap it)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, by a scan of ``/proc/*/stat``."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parent[int(entry.name)] = stat[1]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()}


def _mapped_shm() -> set[str]:
    """``/dev/shm`` entries some live process has mapped (so they are not a leak of ours)."""
    names = set()
    for entry in Path("/proc").iterdir():
        try:
            maps = (entry / "maps").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        names.update(
            line.split("/dev/shm/", 1)[1].split()[0]
            for line in maps.splitlines()
            if "/dev/shm/" in line
        )
    return names


def _wait_for_workers(proc: subprocess.Popen, shm_before: set[str], log: Path) -> set[int]:
    """Children of ``proc`` once ``WORKERS`` grain workers run and have output in ``/dev/shm``."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"train.py ended early:\n{log.read_text()[-3000:]}"
        children = _descendants(proc.pid)
        workers = [c for c in children if "multiprocessing.spawn" in _cmdline(c)]
        produced = any(n.startswith("psm_") for n in _shm_entries() - shm_before)
        if len(workers) >= WORKERS and produced:
            return children
        time.sleep(0.2)
    pytest.fail(f"no {WORKERS} producing data-loader workers after {START_TIMEOUT_S} s")


def _run_entries(shm_before: set[str]) -> set[str]:
    """``/dev/shm`` entries of a dead run: new since it started and mapped by no live process."""
    new = {n for n in _shm_entries() - shm_before if n.startswith(("psm_", "sem.mp-"))}
    return new - _mapped_shm() if new else new


def _clean_up(children: set[int], shm_before: set[str]) -> None:
    """After a failure: SIGKILL our stray workers, give the resource tracker a moment to unlink
    the run's entries and exit, then remove whatever it left."""
    workers = {c for c in children if "resource_tracker" not in _cmdline(c)}
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in children:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for name in _run_entries(shm_before):
        (SHM / name).unlink(missing_ok=True)


def test_sigkill_of_train_py_leaves_no_workers_and_no_shared_memory(tmp_path: Path) -> None:
    label = _write_dataset(tmp_path / "widerface" / "train")
    log = tmp_path / "train.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RETINAFACE_SHARED", None)
    shm_before = _shm_entries()
    args = ["--data", str(label), "--image-size", "64", "--batch-size", "4", "--epochs", "1000"]
    args += ["--num-workers", str(WORKERS), "--pretrained", "none", "--no-export", "--no-progress"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args, "--workdir", str(tmp_path / "run")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    children: set[int] = set()
    try:
        children = _wait_for_workers(proc, shm_before, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        while any(_alive(c) for c in children) and time.monotonic() - killed_at < EXIT_TIMEOUT_S:
            time.sleep(0.05)
        took = time.monotonic() - killed_at
        alive = {c: _cmdline(c)[:120] for c in children if _alive(c)}
        assert not alive, f"still running {EXIT_TIMEOUT_S} s after the SIGKILL: {alive}"
        left = _run_entries(shm_before)
        assert not left, f"left in /dev/shm after the children exited ({took:.1f} s): {left}"
        print(f"all {len(children)} children of train.py exited {took:.2f} s after its SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _clean_up(children, shm_before)
