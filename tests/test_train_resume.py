"""``python train.py`` end to end on the shared WIDER FACE train images, killed and resumed.

A run killed with SIGKILL at an arbitrary moment (after its first checkpoint) and continued with
``--resume`` must end with exactly the parameters of an uninterrupted run. The runs share a JAX
compilation cache in a temporary directory so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import assert_trees_close

from retinaface_jax.weights.run_checkpoint import Checkpoints, load_checkpoint_variables

REPO = Path(__file__).resolve().parents[1]
STEPS = 10
SHM = Path("/dev/shm")


def _cli(shared: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--backbone",
        "mobilenet",
        "--data",
        str(shared / "data" / "widerface" / "train" / "label.txt"),
        "--pretrained",
        str(shared / "data" / "weights" / "mobilenetV1X0.25_pretrain.tar"),
        "--image-size",
        "128",
        "--batch-size",
        "4",
        "--max-steps",
        str(STEPS),
        "--checkpoint-every",
        "2",
        "--num-workers",
        "1",
        "--no-progress",
        "--workdir",
        str(workdir),
        *extra,
    ]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "RETINAFACE_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that a live process has mapped or open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            used.update(re.findall(r"/dev/shm/(\S+)", (proc / "maps").read_text()))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(target.removeprefix("/dev/shm/"))
        except OSError:  # the process ended, or is not ours to read
            continue
    return used


@pytest.fixture
def no_shm_leak():
    """Remove the shared memory a SIGKILLed run leaves behind.

    Killing the run's process group also kills multiprocessing's resource tracker, so the data
    loader's shared-memory segments and semaphores stay in /dev/shm, i.e. in RAM (this machine had
    collected ~1,000 of them, 102 MB, from earlier test runs). Afterwards, this removes the ones
    that appeared during the test and that no live process uses.
    """
    before = set(os.listdir(SHM)) if SHM.is_dir() else None
    yield
    if before is None:
        return
    stale = set(os.listdir(SHM)) - before - _shm_in_use()
    for name in stale:
        if name.startswith(("psm_", "sem.mp-")):
            (SHM / name).unlink(missing_ok=True)


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(shared, tmp_path, env, no_shm_leak):
    full = tmp_path / "full"
    done = _run(_cli(shared, full), env)
    assert f"done: step {STEPS}" in done.stdout

    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with log.open("w") as err:
        # own session: the kill also reaches the data loader's worker processes, as when a job
        # is killed by a scheduler
        proc = subprocess.Popen(
            _cli(shared, killed),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 1200
            while not (killed / "checkpoints" / "2").is_dir():
                assert proc.poll() is None, f"run ended early:\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, "no checkpoint within the time limit"
                time.sleep(0.02)
            time.sleep(np.random.default_rng().uniform(0.0, 0.5))  # an arbitrary moment after
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = Checkpoints(killed, read_only=True).latest_step()
    assert latest is not None and latest < STEPS

    _run(_cli(shared, killed, "--resume"), env)
    _, p_full, s_full, step_full = load_checkpoint_variables(full)
    _, p_res, s_res, step_res = load_checkpoint_variables(killed)
    assert step_full == step_res == STEPS
    assert_trees_close(p_full, p_res, rtol=0, atol=0)
    assert_trees_close(s_full, s_res, rtol=0, atol=0)

    losses = [
        [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (full, killed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


@pytest.mark.slow
def test_workdir_and_export_load_as_models(shared, tmp_path, env):
    """``load_model(WORKDIR)`` (latest checkpoint) and ``load_model(WORKDIR/export)`` agree."""
    from retinaface_jax.weights.load import load_model

    run = tmp_path / "run"
    _run(_cli(shared, run, "--max-steps", "2"), env)
    from_workdir = load_model(run)
    from_export = load_model(run / "export")
    a = nnx.to_pure_dict(nnx.state(from_workdir))
    b = nnx.to_pure_dict(nnx.state(from_export))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert_trees_close(a, b, rtol=0, atol=0)
    _, params, _, _ = load_checkpoint_variables(run)
    kernel = from_export.body.stage1.layers[0].layers[0].kernel[...]
    np.testing.assert_array_equal(
        kernel, params["body"]["stage1"]["layers"]["0"]["layers"]["0"]["kernel"]
    )
    x = np.zeros((1, 64, 64, 3), np.float32)
    loc, conf, landm = from_export(x)
    assert np.isfinite(np.asarray(conf)).all()
