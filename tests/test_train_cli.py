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


def test_no_data_says_where_wider_face_comes_from_and_the_layout(tmp_path):
    done = _train([], tmp_path)  # the default --data, ./data/widerface/train/label.txt
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("train.py: error: --data data/widerface/train/label.txt: no such")
    for needed in ("WIDER FACE site", "Pytorch_Retinaface", "five landmarks"):
        assert needed in done.stderr
    assert "data/widerface/train/images/<event>/<name>.jpg" in done.stderr


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--num-workers", "-1", "must be >= 0"),
        ("--lr", "abc", "expected a number"),
        ("--batch-size", "0", "must be positive"),
        ("--image-size", "16", "must be >= 32"),
        ("--kernels", "fast", "invalid choice: 'fast'"),
    ],
)
def test_bad_flag_values_are_one_line_errors(tmp_path, flag, value, says):
    (tmp_path / "label.txt").write_text("# a.jpg\n")
    done = _train(["--data", str(tmp_path / "label.txt"), flag, value], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument {flag}: {says}" in done.stderr


def test_data_directory_and_file_workdir_are_clear_errors(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "label.txt").write_text("# a.jpg\n")
    done = _train(["--data", str(tmp_path / "train")], tmp_path)
    assert done.returncode == 2 and "is a directory" in done.stderr
    assert f"did you mean --data {tmp_path / 'train' / 'label.txt'}" in done.stderr
    (tmp_path / "afile").write_text("")
    done = _train(["--data", str(tmp_path / "train" / "label.txt"), "--workdir", "afile"], tmp_path)
    assert done.returncode == 2 and "--workdir afile: exists and is not a directory" in done.stderr


def test_malformed_label_file_is_one_error_and_debug_shows_the_traceback(tmp_path):
    label = tmp_path / "label.txt"
    label.write_text("".join(f"not, a label line {i}\n" for i in range(100)) + "# x.jpg\n1 2\n")
    args = ["--data", str(label), "--workdir", str(tmp_path / "w"), "--pretrained", "none"]
    done = _train(args, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert len(errors) == 1 and "expected a RetinaFace label.txt" in errors[0]
    assert done.stderr.count("skipped") <= 25  # the first bad lines are logged, not all 100
    assert not (tmp_path / "w").exists()  # checked before anything is written
    debug = _train([*args, "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_labels_without_their_images_name_the_expected_layout(tmp_path):
    from retinaface_jax.data.labels import load_training_records

    label = tmp_path / "label.txt"
    label.write_text("# 0--Parade/a.jpg\n1 2 3 4\n")
    with pytest.raises(ValueError, match=r"could be read under .*images.*<event>/<name>\.jpg"):
        load_training_records(label)
