"""Building models: cheap imports, abstract structures, one random draw per model, no per-weight
programs. Compile counts come from a fresh subprocess, so earlier tests' caches cannot hide them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from retinaface_jax import RetinaFace, get_config
from retinaface_jax.models.layers import SHAPES_ONLY, BatchNorm2d, Conv2d, Linear
from retinaface_jax.models.net import MobileNetV1
from retinaface_jax.models.retinaface import abstract_model

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_package_does_not_import_jax():
    # detect.py / train.py re-execute themselves (malloc_tuning) before JAX is worth loading
    out = _run(
        """
        import sys
        import retinaface_jax, retinaface_jax.malloc_tuning
        print(sorted(m for m in ("jax", "flax", "numpy") if m in sys.modules))
        """
    )
    assert out == "[]"


@pytest.fixture(scope="module")
def compile_counts(shared) -> dict[str, int]:
    """Backend compilations while building each kind of model, in a fresh process."""
    weights = shared / "data/weights/mobilenet0.25_Final.pth"
    out = _run(
        f"""
        import json
        import jax.monitoring
        from flax import nnx
        from retinaface_jax import RetinaFace, get_config, load_model
        from retinaface_jax.models.retinaface import abstract_model

        n = [0]
        def count(name, *_, **__):
            n[0] += name == "/jax/core/compile/backend_compile_duration"
        jax.monitoring.register_event_duration_secs_listener(count)

        def compiles(build):
            before = n[0]
            build()
            return n[0] - before

        cfg = get_config("mobilenet0.25")
        print(json.dumps({{
            "abstract": compiles(lambda: abstract_model(cfg)),
            "random": compiles(lambda: RetinaFace(cfg, rngs=nnx.Rngs(0))),
            "pth": compiles(lambda: load_model({str(weights)!r})),
        }}))
        """
    )
    return json.loads(out)


def test_an_abstract_model_compiles_nothing(compile_counts):
    assert compile_counts["abstract"] == 0


def test_a_random_model_compiles_one_draw_not_one_program_per_shape(compile_counts):
    # per-parameter draws compiled ~50 programs (0.3-0.9 s each on a 2-core CPU)
    assert compile_counts["random"] <= 8, compile_counts


def test_loading_weights_compiles_no_program_per_array(compile_counts):
    # jnp.asarray outside a trace compiled a copy program per weight shape (33)
    assert compile_counts["pth"] <= 2, compile_counts


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
def test_abstract_model_equals_eval_shape(backbone):
    cfg = get_config(backbone)
    ours = abstract_model(cfg)
    ref = nnx.eval_shape(lambda: RetinaFace(cfg))
    assert nnx.graphdef(ours) == nnx.graphdef(ref)
    a, b = nnx.state(ours), nnx.state(ref)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(x == y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(a))


def _check_init(module: nnx.Module) -> None:
    """torch's initial values: U(+-1/sqrt(fan_in)) weights/biases, BatchNorm 1, 0, 0, 1."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, (Conv2d, Linear)):
            bound = 1 / np.sqrt(np.prod(m.kernel.shape[:-1]))
            for var in (m.kernel, m.bias):
                if var is not None:
                    v = np.asarray(var[...])
                    assert np.abs(v).max() <= bound
                    if v.size >= 256:  # U(-b, b): max |v| near b, std b / sqrt(3)
                        assert np.abs(v).max() > 0.95 * bound
                        assert 0.5 * bound < v.std() < 0.65 * bound
        elif isinstance(m, BatchNorm2d):
            for var, value in ((m.scale, 1), (m.bias, 0), (m.mean, 0), (m.var, 1)):
                assert np.all(np.asarray(var[...]) == value)


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
def test_eager_and_jitted_construction_give_the_same_values(backbone):
    cfg = get_config(backbone)
    eager = RetinaFace(cfg, rngs=nnx.Rngs(7))
    jitted = nnx.jit(lambda: RetinaFace(cfg, rngs=nnx.Rngs(7)))()
    other = RetinaFace(cfg, rngs=nnx.Rngs(8))
    _check_init(eager)
    a, b, c = (jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (eager, jitted, other))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])  # the seed matters
    # distinct layers get distinct values (one draw, split without overlap)
    kernels = [
        np.asarray(m.kernel[...]) for _, m in nnx.iter_modules(eager) if isinstance(m, Conv2d)
    ]
    same = [k for k in kernels if k.shape == kernels[-1].shape]
    assert len(same) >= 2 and not np.array_equal(same[0], same[1])


def test_standalone_modules_initialise_themselves():
    _check_init(MobileNetV1(include_top=True, rngs=nnx.Rngs(0)))
    _check_init(Conv2d(4, 8, 3, rngs=nnx.Rngs(0)))
    _check_init(BatchNorm2d(8))
    m = MobileNetV1(rngs=SHAPES_ONLY)  # what an enclosing composite passes: shapes only
    kernels = [mod.kernel.get_value() for _, mod in nnx.iter_modules(m) if isinstance(mod, Conv2d)]
    assert kernels and all(isinstance(k, jax.ShapeDtypeStruct) for k in kernels)
