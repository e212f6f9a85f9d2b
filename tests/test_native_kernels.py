"""Building, caching, loading and falling back for the native CPU kernels (not their numerics).

Registration with JAX is per process, so ``native_kernels_available()`` is exercised in fresh
subprocesses when it must succeed; failure paths (which register nothing) run in-process with the
module's once-per-process state reset. Only one real compile happens (the module-scoped ``built``
fixture); other build mechanics use a fake compiler that "compiles" by copying that library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from retinaface_jax.backends.native import build as native

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """One real build shared by the module: (cache dir, library path)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETINAFACE_CACHE", str(cache))
        mp.delenv("CXX", raising=False)
        try:
            path = native.build()
        except native.NativeKernelError as err:
            pytest.skip(f"no working C++ compiler: {err}")
    return cache, path


@pytest.fixture
def fresh_state(monkeypatch):
    """Reset the once-per-process answer (restored afterwards) for in-process failure tests."""
    monkeypatch.setattr(native, "_available", None)
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)


def fake_compiler(tmp_path: Path, library: Path, *, sleep: float = 0) -> tuple[Path, Path]:
    """A compiler script that logs each compile and copies ``library`` to its ``-o`` argument."""
    log = tmp_path / "compiles.log"
    script = tmp_path / "fakecxx"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            if [ "$1" = "--version" ]; then echo "fakecxx 1.0"; exit 0; fi
            echo compile >> "{log}"
            sleep {sleep}
            out=""
            while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
            cp "{library}" "$out"
            """
        )
    )
    script.chmod(0o755)
    return script, log


def compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def run_python(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter with extra ``env``; return the JSON it prints last."""
    full = {**os.environ, **env}
    for key in ("CXX", native.ENV_SWITCH):
        if key not in env:
            full.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_build_creates_the_library_in_the_cache_and_reuses_it(built, monkeypatch):
    cache, path = built
    monkeypatch.setenv("RETINAFACE_CACHE", str(cache))
    monkeypatch.delenv("CXX", raising=False)
    assert path == native.library_path()
    assert path.parent == cache / "kernels"
    assert path.name.startswith("cpu_conv-") and path.suffix == ".so"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left over
    before = path.stat()

    def no_compile(*args, **kwargs):
        raise AssertionError("build() recompiled although the library is cached")

    monkeypatch.setattr(native, "_compile", no_compile)
    assert native.build() == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_force_rebuilds_atomically_with_a_new_file(built, tmp_path, monkeypatch):
    _, library = built
    cxx, log = fake_compiler(tmp_path, library)
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    path = native.build()
    assert compiles(log) == 1 and path.read_bytes() == library.read_bytes()
    assert native.build() == path and compiles(log) == 1
    inode = path.stat().st_ino
    assert native.build(force=True) == path and compiles(log) == 2
    assert path.stat().st_ino != inode  # replaced by os.replace, not rewritten in place
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_key_depends_on_source_compiler_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    try:
        original = native.library_path()
    except native.NativeKernelError as err:
        pytest.skip(str(err))
    assert native.library_path() == original  # deterministic
    sources = native.SOURCES
    keys = {original}
    for i, path in enumerate(sources):  # an edit to any file of the split changes the key
        edited = tmp_path / "edited" / str(i) / path.name
        edited.parent.mkdir(parents=True)
        edited.write_bytes(path.read_bytes() + b"\n// edited\n")
        monkeypatch.setattr(native, "SOURCES", (*sources[:i], edited, *sources[i + 1 :]))
        keys.add(native.library_path())
        assert len(keys) == i + 2, f"editing {path.name} left the cache key unchanged"
    changed_source = native.library_path()
    assert changed_source != original and changed_source.parent == original.parent
    monkeypatch.setattr(native, "CXXFLAGS", (*native.CXXFLAGS, "-g"))
    assert native.library_path() not in (original, changed_source)
    monkeypatch.setattr(native, "CXXFLAGS", native.CXXFLAGS[:-1])
    monkeypatch.setenv("CXX", "false")
    assert native.library_path() not in (original, changed_source)


def test_sources_cover_every_file_of_the_split_and_ship_as_package_data():
    """SOURCES (the cache key's files) is exactly cpu_conv.cc and the headers it includes, every
    one of them resolvable, and pyproject.toml's package data ships them all."""
    import re
    import tomllib

    assert native.SOURCES[0] == native.SOURCE
    here = native.SOURCE.parent
    assert sorted(native.SOURCES[1:]) == sorted((here / "src").glob("*.h"))
    resolved = [path.resolve() for path in native.SOURCES]
    included = set()
    for path in native.SOURCES:
        for name in re.findall(r'^#include "([^"]+)"', path.read_text(), re.M):
            if name.startswith("xla/"):
                continue
            target = (path.parent / name).resolve()
            assert target in resolved, f"{path.name} includes {name}, not in SOURCES"
            included.add(target)
    assert included == set(resolved[1:])
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["retinaface_jax.backends.native"]
    for path in native.SOURCES:
        relative = path.relative_to(here)
        assert any(
            relative.match(p) and len(relative.parts) == len(Path(p).parts) for p in patterns
        ), f"{relative} is not shipped by {patterns}"


def test_failing_compiler_raises_with_command_source_and_stderr(tmp_path, monkeypatch):
    cxx = tmp_path / "badcxx"
    cxx.write_text('#!/bin/sh\necho "fatal: something broke on purpose" >&2\nexit 3\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    with pytest.raises(native.NativeKernelError) as info:
        native.build()
    message = str(info.value)
    assert str(cxx) in message and str(native.SOURCE) in message and "-march=native" in message
    assert "status 3" in message and "something broke on purpose" in message
    assert not native.library_path().exists()
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # temporary removed


def test_compile_timeout_kills_the_compiler(built, tmp_path, monkeypatch):
    _, library = built
    cxx, log = fake_compiler(tmp_path, library, sleep=60)
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setattr(native, "COMPILE_TIMEOUT", 1.0)
    start = time.perf_counter()
    with pytest.raises(native.NativeKernelError, match="timed out after 1 s"):
        native.build()
    assert time.perf_counter() - start < 30
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_unwritable_cache_builds_into_a_temporary_directory(built, tmp_path, monkeypatch):
    _, library = built
    cxx, log = fake_compiler(tmp_path, library)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("RETINAFACE_CACHE", str(blocker / "cache"))  # mkdir fails
    monkeypatch.setenv("CXX", str(cxx))
    path = native.build()
    try:
        assert compiles(log) == 1 and path.is_file()
        assert path.name == native.library_path().name and not path.is_relative_to(blocker)
    finally:
        path.unlink()
        path.parent.rmdir()


def test_switch_off_gives_false_without_compiling(tmp_path, monkeypatch, fresh_state):
    cxx = tmp_path / "nocxx"
    cxx.write_text(f"#!/bin/sh\ntouch {tmp_path / 'called'}\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.native_kernels_available() is False
    assert not (tmp_path / "called").exists() and not (tmp_path / "cache").exists()


def test_unsupported_platform_gives_false_without_compiling(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.platform, "machine", lambda: "sparc64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.native_kernels_available() is False
    assert not (tmp_path / "cache").exists()


def test_failing_compiler_warns_once_and_falls_back(tmp_path, monkeypatch, fresh_state):
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.native_kernels_available() is False
        assert native.native_kernels_available() is False  # cached answer, no second warning
    assert [w.category for w in caught] == [RuntimeWarning]
    message = str(caught[0].message)
    assert "false" in message and str(native.SOURCE) in message
    assert "falling back to the XLA formulation" in message
    assert caught[0].filename == __file__  # points at the caller


def test_registered_target_runs_in_a_fresh_process(built):
    cache, path = built
    inode = path.stat().st_ino
    out = run_python(
        """
        import json
        import numpy as np
        import jax, jax.numpy as jnp
        from retinaface_jax.backends.native.build import native_kernels_available

        ok = [native_kernels_available(), native_kernels_available()]
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 16)), jnp.float32)
        # one parameter buffer: weights [0, 2304), bias [2304, 2320), slopes [2320, 2336)
        params = jnp.zeros(3 * 3 * 16 * 16 + 16 + 16, jnp.float32)
        # results: y, and no row moments (an empty second result)
        shapes = (jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32),
                  jax.ShapeDtypeStruct((0,), jnp.float32))
        call = jax.ffi.ffi_call("retinaface_conv", shapes)
        y, _ = call(x, params, stride=np.int64(1), pad=np.int64(1), kh=np.int64(3),
                    kw=np.int64(3), cin=np.int64(16), cin_offset=np.int64(0),
                    w_offset=np.int64(0), b_offset=np.int64(2304), s_offset=np.int64(2320))
        # and the top-k + NMS target: the best box, its duplicate suppressed, the disjoint one
        scores = jnp.asarray([[0.9, 0.8, 0.7]], jnp.float32)
        boxes = jnp.asarray([[[0, 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29]]], jnp.float32)
        out = (jax.ShapeDtypeStruct((1, 3), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
        nms = jax.ffi.ffi_call("retinaface_topk_nms", out)
        keep, count = nms(scores, boxes, jnp.float32(0.4), top_k=np.int64(3))
        print(json.dumps({"ok": ok, "shape": list(y.shape), "max": float(jnp.abs(y).max()),
                          "keep": keep.tolist(), "count": count.tolist()}))
        """,
        {"RETINAFACE_CACHE": str(cache)},
    )
    assert out == {
        "ok": [True, True],
        "shape": [1, 8, 8, 16],
        "max": 0.0,
        "keep": [[0, 2, -1]],
        "count": [2],
    }
    assert path.stat().st_ino == inode  # reused, not rebuilt


def test_truncated_cached_library_is_rebuilt_and_loads(built, tmp_path, monkeypatch):
    _, library = built
    cxx, log = fake_compiler(tmp_path, library)  # "rebuilds" by copying the real library
    env = {"RETINAFACE_CACHE": str(tmp_path / "cache"), "CXX": str(cxx)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(library.read_bytes()[:4096])
    out = run_python(
        """
        import json, warnings
        from retinaface_jax.backends.native.build import native_kernels_available

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = native_kernels_available()
        print(json.dumps({"ok": ok, "warnings": [str(w.message) for w in caught]}))
        """,
        env,
    )
    assert out == {"ok": True, "warnings": []}
    assert compiles(log) == 1
    assert path.read_bytes() == library.read_bytes()


@pytest.mark.parametrize("keep", [0, 63, 4096, -1])
def test_truncated_library_is_rejected_before_dlopen(built, tmp_path, keep):
    # dlopen of a truncated ELF file can die with SIGBUS instead of raising: check the headers first
    _, library = built
    data = library.read_bytes()
    broken = tmp_path / "broken.so"
    broken.write_bytes(data[:keep])
    with pytest.raises(native.NativeKernelError, match=str(broken)):
        native._load(broken)
