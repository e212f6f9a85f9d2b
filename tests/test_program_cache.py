"""Exported detection programs: same detections as the plain jitted program, loaded from disk by
a new detector without tracing, rewritten when unreadable, keyed by what shapes them."""

from __future__ import annotations

import cv2
import jax
import numpy as np
import pytest

from retinaface_jax import Detector
from retinaface_jax.inference import program_cache
from retinaface_jax.inference.program_cache import SUFFIX, ExportedPrograms
from retinaface_jax.weights.load import load_model


@pytest.fixture(scope="module")
def model(shared):
    return load_model(shared / "data" / "weights" / "mobilenet0.25_Final.pth")


@pytest.fixture(scope="module")
def image(shared):
    img = cv2.imread(str(shared / "data" / "images" / "biubug6_curve_test.jpg"))
    return np.ascontiguousarray(img[:150, :200])  # small: quick to compile


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache root (programs and JAX's compilation cache), restored afterwards."""
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path))
    monkeypatch.delenv("RETINAFACE_JAX_CACHE", raising=False)
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", previous)


def _rows(faces):
    return np.array([[*f.box, f.score, *np.ravel(f.landmarks)] for f in faces], np.float32)


def _programs(root):
    return sorted((root / "programs").glob(f"*{SUFFIX}"))


def test_exported_programs_detect_the_same_and_load_without_tracing(
    model, image, cache, monkeypatch
):
    plain = _rows(Detector(model, compilation_cache=False).detect(image))
    first = Detector(model)
    assert isinstance(first._run, ExportedPrograms)
    exported = _rows(first.detect(image))
    assert len(plain) > 3
    np.testing.assert_array_equal(exported, plain)
    files = _programs(cache)
    assert len(files) == 1

    def no_export(*_, **__):
        raise AssertionError("a cached program was exported again")

    monkeypatch.setattr(program_cache.export, "export", no_export)
    np.testing.assert_array_equal(_rows(Detector(model).detect(image)), plain)
    assert _programs(cache) == files


def test_an_unreadable_program_is_exported_again(model, image, cache, caplog):
    plain = _rows(Detector(model).detect(image))
    (path,) = _programs(cache)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    np.testing.assert_array_equal(_rows(Detector(model).detect(image)), plain)
    assert "ignoring unreadable exported program" in caplog.text
    program_cache.export.deserialize(bytearray(path.read_bytes()))  # rewritten, whole again


def test_the_key_covers_source_context_shapes_and_static_arguments(tmp_path, monkeypatch):
    fixed = [np.zeros((3, 3), np.float32)]

    def key_path(context="cfg", fixed=fixed, shape=(1, 32, 32, 3), static=(("k", 10),)):
        programs = ExportedPrograms(lambda *a: a, tmp_path, fixed, context, None)
        sig = program_cache._signature([np.zeros(shape, np.uint8)])
        return programs.path_for((sig, static))

    base = key_path()
    assert key_path() == base
    assert key_path(context="other cfg") != base
    assert key_path(fixed=[np.zeros((3, 4), np.float32)]) != base
    assert key_path(shape=(2, 32, 32, 3)) != base
    assert key_path(static=(("k", 11),)) != base
    program_cache.source_digest.cache_clear()
    monkeypatch.setattr(program_cache, "source_digest", lambda: "edited checkout")
    assert key_path() != base
