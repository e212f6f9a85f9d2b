"""``python -m retinaface_jax.convert`` on hostile files: one line on stderr, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_torch_reader import self_referential
from torch_files import write_legacy

REPO = Path(__file__).resolve().parents[1]


def convert(*args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RETINAFACE_DEBUG"}
    if debug_env:
        env["RETINAFACE_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "retinaface_jax.convert", *args],
        capture_output=True,
        text=True,
        timeout=120,  # a hang (the old cycle bug) fails instead of blocking the suite
        cwd=REPO,
        env=env,
        check=False,
    )


@pytest.fixture
def hostile(tmp_path) -> Path:
    return write_legacy(tmp_path / "cycle.pth", self_referential("state_dict"))


def test_hostile_checkpoint_one_line_error(tmp_path, hostile):
    done = convert(str(hostile), str(tmp_path / "out"))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m retinaface_jax.convert: error: ")
    assert str(hostile) in lines[0] and "contains itself" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_garbage_file_one_line_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    done = convert(str(garbage), str(tmp_path / "out"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and str(garbage) in done.stderr


@pytest.mark.parametrize("how", ["--debug", "RETINAFACE_DEBUG=1"])
def test_debug_shows_traceback(tmp_path, hostile, how):
    args = [str(hostile), str(tmp_path / "out")]
    done = convert(*args, "--debug") if how == "--debug" else convert(*args, debug_env=True)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "CheckpointError" in done.stderr
