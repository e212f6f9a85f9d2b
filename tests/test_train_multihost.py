"""Multi-host data parallelism: 2 processes x 2 CPU devices == 1 process x 4 devices.

The test starts two copies of this file as worker processes on 127.0.0.1 (gloo collectives,
``jax.distributed.initialize`` with a coordinator on a free port). Each worker feeds only its half
of the global batch (``jax.make_array_from_process_local_data``) and writes the resulting loss and
parameters; they must equal a single 4-device process's.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flatten(params: dict, stats: dict) -> dict[str, np.ndarray]:
    """``{'params[...]': array, 'stats[...]': array}`` for saving and comparing."""
    import jax

    out = {}
    for prefix, tree in (("params", params), ("stats", stats)):
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(v)
    return out


def worker(port: int, process_id: int, out: Path) -> None:
    """One process of the 2-process run (executed as ``python this_file.py --worker ...``)."""
    import jax

    jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from retinaface_jax.train.sharding import initialize_distributed

    assert initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
    assert jax.process_count() == NUM_PROCESSES and len(jax.devices()) == 4

    sys.path.insert(0, str(HERE))
    from test_train_step import BATCH, make_batches, run_steps

    share = BATCH // NUM_PROCESSES
    rows = slice(process_id * share, (process_id + 1) * share)
    local = [{k: v[rows] for k, v in b.items()} for b in make_batches(1)]
    metrics, params, stats = run_steps(jax.devices(), local)
    np.savez(out, loss=metrics[0]["loss"], **_flatten(params, stats))
    jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    import jax
    from test_train_step import make_batches, run_steps

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(port), str(i), str(tmp_path / f"{i}.npz")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"

    metrics, params, stats = run_steps(jax.devices()[:4], make_batches(1))
    expected = _flatten(params, stats)
    for i in range(NUM_PROCESSES):
        with np.load(tmp_path / f"{i}.npz") as got:
            assert float(got["loss"]) == pytest.approx(metrics[0]["loss"], rel=1e-5)
            assert set(got.files) - {"loss"} == set(expected)
            for k, v in expected.items():
                np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("PORT", "PROCESS_ID", "OUT"), required=True)
    port_, pid_, out_ = parser.parse_args().worker
    worker(int(port_), int(pid_), Path(out_))
