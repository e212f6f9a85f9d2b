"""``python train.py``: argument errors are clear; ResNet50 trains end to end from random init."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], cwd: Path, timeout: int = 120, **env_extra: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    env.pop("RETINAFACE_SHARED", None)  # so no backbone is found unless given
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_missing_data_file_is_a_clear_error(tmp_path):
    done = _train(
        ["--data", str(tmp_path / "nope.txt"), "--workdir", str(tmp_path / "w")], tmp_path
    )
    assert done.returncode == 2
    assert "nope.txt" in done.stderr and "no such annotation file" in done.stderr
    assert not (tmp_path / "w").exists()


def test_unknown_backbone_is_a_clear_error(tmp_path):
    done = _train(["--backbone", "vgg", "--data", str(tmp_path)], tmp_path)
    assert done.returncode == 2 and "vgg" in done.stderr and "mobilenet" in done.stderr


@pytest.mark.slow
def test_resnet50_trains_from_random_init_with_warning(shared, tmp_path):
    workdir = tmp_path / "re50"
    done = _train(
        [
            "--backbone",
            "resnet50",
            "--data",
            str(shared / "data" / "widerface" / "train" / "label.txt"),
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--epochs",
            "3",
            "--max-steps",
            "2",
            "--lr",
            "0.0005",
            "--num-workers",
            "0",
            "--workdir",
            str(workdir),
        ],
        tmp_path,
        timeout=3000,
        RETINAFACE_CACHE=str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "no ImageNet-pretrained resnet50 backbone found" in done.stderr
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(0.0005)
    saved = (workdir / "config.toml").read_text()
    assert 'backbone = "resnet50"' in saved and "image_size = 64" in saved and "epochs = 3" in saved
    assert (workdir / "export" / "config.toml").is_file()
