"""StableHLO export (``retinaface_jax.export.stablehlo``): the serialized detection programs,
run in a fresh interpreter that imports only jax and numpy, reproduce ``Detector.detect``
(XLA path) on real images of odd and bucket-exact sizes; lowering for cpu, cuda and tpu."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

PLATFORMS = ("cpu", "cuda", "tpu")

# the loader recipe of the module docstring, in a process without retinaface_jax
LOADER = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from jax import export

    program_file, images_file, out_file = sys.argv[1:4]
    f = np.load(program_file)
    meta = json.loads(str(f["meta"]))
    weights = [f[f"weight_{i}"] for i in range(meta["num_weights"])]
    results = {}
    with np.load(images_file) as images:
        for name in images.files:
            image = images[name]
            h, w = image.shape[:2]
            program = export.deserialize(bytearray(f[f"program_{h}x{w}"].tobytes()))
            rows, count = program.call(weights, image)
            results[name] = np.asarray(rows)[: int(count)]
            results[name + "_platforms"] = np.asarray(program.platforms)
    np.savez(out_file, **results)
    assert not any(m.startswith("retinaface_jax") for m in sys.modules), "retinaface_jax imported"
    assert "cv2" not in sys.modules
    print("OK", sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "numpy"))[:1])
    """
)


@pytest.fixture(scope="module")
def weights(shared: Path) -> Path:
    return shared / "data" / "weights" / "mobilenet0.25_Final.pth"


@pytest.fixture(scope="module")
def images(shared: Path) -> dict[str, np.ndarray]:
    """Real photos: 719 x 1280 (odd height), a 333 x 517 crop (both odd) and a 384 x 640 crop
    (a bucket size: the detector runs it unpadded)."""
    root = shared / "data" / "images"

    def read(name: str) -> np.ndarray:
        image = cv2.imread(str(root / name))
        assert image is not None, name
        return image

    return {
        "timg": read("kinghoowei_timg.jpg"),
        "curve": np.ascontiguousarray(read("biubug6_curve_test.jpg")[:333, :517]),
        "ncnn": np.ascontiguousarray(read("fd1mb_ncnn_sample.jpg")[:384, :640]),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights: Path, images: dict[str, np.ndarray]) -> Path:
    from retinaface_jax.export.stablehlo import export_stablehlo

    out = tmp_path_factory.mktemp("stablehlo") / "retinaface.npz"
    sizes = [im.shape[:2] for im in images.values()]
    path = export_stablehlo(out, weights=weights, platforms=PLATFORMS, sizes=sizes)
    assert path == out and out.is_file()
    return out


@pytest.fixture(scope="module")
def detector(weights: Path):
    import retinaface_jax

    return retinaface_jax.Detector.from_pretrained(weights, kernels="xla")


def _rows(faces) -> np.ndarray:
    return np.array(
        [[*f.box, f.score, *np.asarray(f.landmarks).reshape(-1)] for f in faces], np.float32
    ).reshape(-1, 15)


def _assert_same(got: np.ndarray, want: np.ndarray, label: str) -> None:
    assert len(want) > 0, label
    assert got.shape == want.shape, (label, got.shape, want.shape)
    np.testing.assert_allclose(got[:, :4], want[:, :4], rtol=0, atol=1e-3, err_msg=label)
    np.testing.assert_allclose(got[:, 4], want[:, 4], rtol=0, atol=1e-5, err_msg=label)
    np.testing.assert_allclose(got[:, 5:], want[:, 5:], rtol=0, atol=1e-3, err_msg=label)


def test_fresh_process_reproduces_detector(tmp_path, exported, images, detector) -> None:
    images_file = tmp_path / "images.npz"
    np.savez(images_file, **images)
    out_file = tmp_path / "out.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(exported), str(images_file), str(out_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # (not the repository: nothing importable from there)
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out_file) as got:
        for name, image in images.items():
            assert tuple(got[name + "_platforms"]) == PLATFORMS
            _assert_same(got[name], _rows(detector.detect(image)), name)


def test_file_layout_and_limits(exported, images) -> None:
    from retinaface_jax.config import get_config
    from retinaface_jax.export.stablehlo import FORMAT, load_programs

    meta, weights, programs = load_programs(exported)
    cfg = get_config("mobilenet0.25")
    assert meta["format"] == FORMAT
    assert meta["platforms"] == list(PLATFORMS)
    assert sorted(programs) == sorted(im.shape[:2] for im in images.values())
    assert (meta["conf_threshold"], meta["nms_threshold"]) == (
        pytest.approx(cfg.conf_threshold),
        pytest.approx(cfg.nms_threshold),
    )
    assert (meta["top_k"], meta["keep_top_k"]) == (cfg.top_k, cfg.keep_top_k)
    for (h, w), program in programs.items():
        assert program.platforms == PLATFORMS
        assert program.in_avals[-1].shape == (h, w, 3)
        assert len(program.in_avals) == len(weights) + 1
        assert program.out_avals[0].shape == (cfg.keep_top_k, 15)


def test_baked_limits_match_detector(tmp_path, weights, images, detector) -> None:
    """Non-default thresholds and limits are the program's, as ``detect``'s arguments."""
    from retinaface_jax.export.stablehlo import export_stablehlo, load_programs

    image = images["curve"]
    limits = {"conf_threshold": 0.5, "nms_threshold": 0.3, "top_k": 300, "keep_top_k": 7}
    path = export_stablehlo(
        tmp_path / "small.npz",
        weights=weights,
        platforms=("cpu",),
        sizes=[image.shape[:2]],
        **limits,
    )
    _, w, programs = load_programs(path)
    rows, count = programs[image.shape[:2]].call(w, image)
    want = _rows(detector.detect(image, **limits))
    assert len(want) == 7
    _assert_same(np.asarray(rows)[: int(count)], want, "limits")


def test_symbolic_priors_equal_pixel_priors() -> None:
    from retinaface_jax.config import get_config
    from retinaface_jax.export.stablehlo import symbolic_priors
    from retinaface_jax.inference.postprocess import pixel_priors

    cfg = get_config("mobilenet0.25")
    h, w = jax.export.symbolic_shape("h, w")
    exported = jax.export.export(
        jax.jit(lambda x: symbolic_priors(cfg, x.shape[0], x.shape[1])), platforms=["cpu"]
    )(jax.ShapeDtypeStruct((h, w), jnp.uint8))
    for size in [(1, 1), (33, 65), (333, 517), (719, 1280), (640, 640)]:
        priors, strides = exported.call(np.zeros(size, np.uint8))
        want_priors, want_strides = pixel_priors(cfg, *size)
        np.testing.assert_array_equal(np.asarray(priors), want_priors, err_msg=str(size))
        np.testing.assert_array_equal(np.asarray(strides), want_strides, err_msg=str(size))


def test_any_size_program_matches_detector(tmp_path, weights, images, detector):
    """``sizes=None`` (the default): one program with symbolic H and W for every size (priors,
    padding and top-k in the program)."""
    from retinaface_jax.export.stablehlo import export_stablehlo, load_programs

    path = export_stablehlo(tmp_path / "any.npz", weights=weights, platforms=PLATFORMS)
    meta, w, programs = load_programs(path)
    assert meta["sizes"] is None and list(programs) == [None]
    tiny = np.ascontiguousarray(images["curve"][70:169, 360:451])  # 99 x 91: fewer priors than k
    for name, image in [("curve", images["curve"]), ("tiny", tiny)]:
        rows, count = programs[None].call(w, image)
        _assert_same(np.asarray(rows)[: int(count)], _rows(detector.detect(image)), name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sizes": [(0, 10)]},
        {"sizes": []},
        {"sizes": [(10.5, 10)]},
        {"conf_threshold": 1.5},
        {"top_k": 0},
        {"keep_top_k": 2.0},
        {"platforms": ()},
    ],
)
def test_bad_arguments(tmp_path, weights, kwargs) -> None:
    from retinaface_jax.export.stablehlo import export_stablehlo

    with pytest.raises(ValueError):
        export_stablehlo(tmp_path / "x.npz", weights=weights, **{"sizes": [(32, 32)], **kwargs})
    assert not (tmp_path / "x.npz").exists()
