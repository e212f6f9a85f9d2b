"""WIDER FACE ground truth from the official .mat files: content and clear errors."""

from __future__ import annotations

import pytest

from retinaface_jax.evaluate.widerface_ap import widerface_ap
from retinaface_jax.evaluate.widerface_gt import load_widerface_gt

MATS = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")


def _official_txt_counts(path):
    """image name -> number of faces, from the official text layout (independent of the .mat)."""
    lines = path.read_text().split("\n")
    out, i = {}, 0
    while i < len(lines) and lines[i].strip():
        name = lines[i].strip().removesuffix(".jpg")
        n = int(lines[i + 1])
        out[name] = n
        i += 2 + max(n, 1)  # zero-face images carry one dummy line
    return out


def test_loads_full_val_set(shared):
    gt_dir = shared / "data" / "widerface" / "gt"
    gt = load_widerface_gt(gt_dir)
    assert len(gt) == 3226 and len(set(gt.names)) == 3226
    counts = _official_txt_counts(gt_dir / "wider_face_val_bbx_gt.txt")
    assert counts == {n: len(b) for n, b in zip(gt.names, gt.boxes, strict=True)}
    for i in range(len(gt)):  # easy ⊆ medium ⊆ hard
        e, m, h = (gt.keep[s][i] for s in ("easy", "medium", "hard"))
        assert not (e & ~m).any() and not (m & ~h).any()


@pytest.mark.parametrize("missing", MATS)
def test_missing_mat_file_is_named(shared, tmp_path, missing):
    src = shared / "data" / "widerface" / "gt"
    for name in MATS:
        if name != missing:
            (tmp_path / name).symlink_to(src / name)
    with pytest.raises(FileNotFoundError, match=missing):
        load_widerface_gt(tmp_path)
    with pytest.raises(FileNotFoundError, match=missing):
        widerface_ap({"0--Parade/0_Parade_marchingband_1_465": []}, tmp_path)


def test_corrupt_mat_file_is_named(shared, tmp_path):
    src = shared / "data" / "widerface" / "gt"
    for name in MATS[1:]:
        (tmp_path / name).symlink_to(src / name)
    (tmp_path / MATS[0]).write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="wider_face_val.mat"):
        load_widerface_gt(tmp_path)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_widerface_gt(tmp_path / "nowhere")
