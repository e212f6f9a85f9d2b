"""The training loop in-process (stand-in detector, synthetic images): resume, Ctrl-C, NaN stop.

The real model, CLI and SIGKILL are exercised by test_train_resume.py; here the loop's own logic
is checked quickly with the small detector from test_train_step.
"""

from __future__ import annotations

import json
import os
import signal

import cv2
import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import TinyDetector, assert_trees_close

from retinaface_jax.config import get_config
from retinaface_jax.train import loop
from retinaface_jax.weights.run_checkpoint import Checkpoints, load_checkpoint_variables

SIZE, BATCH, IMAGES = 64, 4, 12


@pytest.fixture()
def dataset(tmp_path):
    """A label.txt with synthetic images (some faces with landmarks, some without, one empty)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(IMAGES):
        h, w = rng.integers(80, 140, 2)
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), rng.integers(0, 255, (h, w, 3), np.uint8))
        lines.append(f"# {i}.jpg")
        for _ in range(0 if i == 3 else int(rng.integers(1, 4))):
            bw, bh = rng.uniform(20, 40, 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            if rng.uniform() < 0.5:
                pts = " ".join(
                    f"{x + bw * a:.1f} {y + bh * b:.1f} 0.0"
                    for a, b in rng.uniform(0.2, 0.8, (5, 2))
                )
                lines.append(f"{x:.1f} {y:.1f} {bw:.1f} {bh:.1f} {pts} 0.9")
            else:
                lines.append(f"{x:.1f} {y:.1f} {bw:.1f} {bh:.1f}")
    (root / "label.txt").write_text("\n".join(lines) + "\n")
    return root / "label.txt"


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    def build(cfg, *, seed=0, **_):
        return TinyDetector(cfg, rngs=nnx.Rngs(seed)), "tiny stand-in"

    monkeypatch.setattr(loop, "build_model", build)


def _cfg(**kw):
    return get_config("mobilenet0.25", image_size=SIZE, batch_size=BATCH, epochs=2, **kw)


def _opts(workdir, data, **kw):
    base = dict(workdir=workdir, data=data, num_workers=0, progress=False, export=False)
    return loop.RunOptions(**{**base, **kw})


def _params(workdir, step=None):
    cfg, params, stats, got_step = load_checkpoint_variables(workdir, step)
    return params, stats, got_step


def test_interrupt_saves_and_resume_is_exact(tmp_path, dataset, monkeypatch):
    full = loop.train(_cfg(), _opts(tmp_path / "full", dataset, max_steps=5, checkpoint_every=100))
    assert full.status == "done" and full.step == 5

    real_iterator = loop.make_train_iterator

    def interrupting(*args, **kwargs):
        it = real_iterator(*args, **kwargs)
        for n, batch in enumerate(it):
            if n == 1:  # Ctrl-C while the second batch is being fetched
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(loop, "make_train_iterator", interrupting)
    part = loop.train(_cfg(), _opts(tmp_path / "part", dataset, max_steps=5, checkpoint_every=100))
    assert part.status == "interrupted" and part.step == 2
    assert Checkpoints(tmp_path / "part", read_only=True).latest_step() == 2
    monkeypatch.setattr(loop, "make_train_iterator", real_iterator)

    with pytest.raises(FileExistsError, match="--resume"):
        loop.train(_cfg(), _opts(tmp_path / "part", dataset, max_steps=5))
    resumed = loop.train(
        _cfg(), _opts(tmp_path / "part", dataset, max_steps=5, checkpoint_every=100, resume=True)
    )
    assert resumed.status == "done" and resumed.step == 5
    p_full, s_full, _ = _params(tmp_path / "full")
    p_res, s_res, step = _params(tmp_path / "part")
    assert step == 5
    assert_trees_close(p_full, p_res, rtol=0, atol=0)
    assert_trees_close(s_full, s_res, rtol=0, atol=0)
    # the metrics of both runs agree step by step
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "full"), read(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, dataset, capsys):
    result = loop.train(
        _cfg(lr=1e30), _opts(tmp_path / "nan", dataset, max_steps=6, checkpoint_every=1)
    )
    assert result.status == "nonfinite"
    assert "non-finite loss" in result.message and "--resume" in result.message
    assert "non-finite loss" in capsys.readouterr().out
    latest = Checkpoints(tmp_path / "nan", read_only=True).latest_step()
    assert latest == result.step  # the last finite step, the failing one was not saved
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == result.step
    assert all(np.isfinite(json.loads(x)["loss"]) for x in lines)
    params, _, _ = _params(tmp_path / "nan")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_metrics_and_config_written(tmp_path, dataset):
    result = loop.train(_cfg(), _opts(tmp_path / "run", dataset, max_steps=2))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss_l", "loss_c", "loss_landm", "lr", "grad_norm", "epoch", "seconds"):
        assert key in rows[0]
    assert "images_per_s" in rows[1]
    assert get_config(tmp_path / "run" / "config.toml") == _cfg()
    assert result.metrics["step"] == 2
