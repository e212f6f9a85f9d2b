"""Train step: recipe pieces (schedule, torch-SGD optimiser) and data-parallel equivalence.

The sharding tests use a small stand-in detector built from the project's own layers (Conv2d,
BatchNorm2d with torch semantics) with RetinaFace's output layout, so they compile in seconds; the
real loss, priors, optimiser and step are used unchanged. One slow test runs the real RetinaFace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.models.layers import BatchNorm2d, Conv2d
from retinaface_jax.models.retinaface import RetinaFace
from retinaface_jax.priors import prior_box
from retinaface_jax.train.optimizer import make_optimizer
from retinaface_jax.train.schedule import learning_rate_schedule
from retinaface_jax.train.sharding import make_mesh, replicate, shard_batch, to_host
from retinaface_jax.train.state import create_train_state
from retinaface_jax.train.step import make_train_step

SIZE, BATCH, FACES = 64, 8, 4


class TinyDetector(nnx.Module):
    """RetinaFace-shaped outputs (loc, conf, landm per prior) from a few strided conv+BN layers."""

    def __init__(self, cfg: RetinaFaceConfig, *, rngs: nnx.Rngs, width: int = 16):
        self.cfg = cfg
        self.stem = Conv2d(3, width, 3, 2, 1, bias=False, rngs=rngs)
        self.stem_bn = BatchNorm2d(width, momentum=cfg.bn_momentum)
        self.down = nnx.List(
            [Conv2d(width, width, 3, 2, 1, bias=False, rngs=rngs) for _ in range(4)]
        )
        self.down_bn = nnx.List([BatchNorm2d(width, momentum=cfg.bn_momentum) for _ in range(4)])
        self.heads = nnx.List([Conv2d(width, cfg.anchor_num * 16, 1, rngs=rngs) for _ in cfg.steps])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = jax.nn.relu(self.stem_bn(self.stem(x)))  # stride 2
        levels = []
        for conv, bn in zip(self.down, self.down_bn, strict=True):
            x = jax.nn.relu(bn(conv(x)))  # strides 4, 8, 16, 32
            levels.append(x)
        levels = levels[1:]  # strides 8, 16, 32 like cfg.steps
        outs = [h(f).reshape(f.shape[0], -1, 16) for h, f in zip(self.heads, levels, strict=True)]
        out = jnp.concatenate(outs, axis=1)
        return out[..., :4], out[..., 4:6], out[..., 6:]


def tiny_cfg() -> RetinaFaceConfig:
    return get_config("mobilenet0.25", image_size=SIZE, batch_size=BATCH)


def make_batches(num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random images and faces (some padding rows, one image without faces)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        xy = rng.uniform(0.0, 0.6, (BATCH, FACES, 2))
        wh = rng.uniform(0.15, 0.4, (BATCH, FACES, 2))
        lm = xy[..., None, :] + wh[..., None, :] * rng.uniform(0.2, 0.8, (BATCH, FACES, 5, 2))
        label = np.where(rng.uniform(size=(BATCH, FACES, 1)) < 0.7, 1.0, -1.0)
        targets = np.concatenate([xy, xy + wh, lm.reshape(BATCH, FACES, 10), label], axis=-1)
        valid = rng.uniform(size=(BATCH, FACES)) < 0.7
        valid[0] = False
        out.append(
            {
                "image": rng.normal(0.0, 60.0, (BATCH, SIZE, SIZE, 3)).astype(np.float32),
                "targets": (targets * valid[..., None]).astype(np.float32),
                "valid": valid,
            }
        )
    return out


def run_steps(
    devices: list, batches: list[dict[str, np.ndarray]], model_fn=None, cfg=None, kernels="auto"
) -> tuple[list[dict[str, float]], dict, dict]:
    """Train from the same initialisation on a ``('data',)`` mesh over ``devices``."""
    cfg = cfg or tiny_cfg()
    model = (model_fn or (lambda: TinyDetector(cfg, rngs=nnx.Rngs(0))))()
    schedule = learning_rate_schedule(cfg, steps_per_epoch=100)
    tx = make_optimizer(cfg, schedule)
    graphdef, state = create_train_state(model, tx)
    mesh = make_mesh(devices)
    state = replicate(state, mesh)
    step = make_train_step(graphdef, cfg, SIZE, tx, schedule, mesh, kernels=kernels)
    metrics = []
    for batch in batches:
        state, m = step(state, shard_batch(batch, mesh))
        metrics.append({k: float(v) for k, v in to_host(m).items()})
    return metrics, to_host(state.params), to_host(state.batch_stats)


def assert_trees_close(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# --- recipe ------------------------------------------------------------------------------------


def test_schedule_decays_at_epoch_boundaries():
    cfg = get_config("mobilenet0.25")  # decay1 190, decay2 220, gamma 0.1, lr 1e-3
    sched = learning_rate_schedule(cfg, steps_per_epoch=10)
    got = {s: float(sched(s)) for s in (0, 1899, 1900, 2199, 2200, 5000)}
    assert got[0] == pytest.approx(1e-3) and got[1899] == pytest.approx(1e-3)
    assert got[1900] == pytest.approx(1e-4) and got[2199] == pytest.approx(1e-4)
    assert got[2200] == pytest.approx(1e-5) and got[5000] == pytest.approx(1e-5)
    assert float(learning_rate_schedule(cfg, 10, lr=0.01)(0)) == pytest.approx(0.01)


def test_schedule_warmup_is_linear():
    cfg = get_config("mobilenet0.25", warmup_epochs=2)
    sched = learning_rate_schedule(cfg, steps_per_epoch=5)
    assert float(sched(0)) == pytest.approx(1e-6)
    assert float(sched(5)) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert float(sched(10)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        learning_rate_schedule(cfg, 0)


def test_optimizer_is_torch_sgd_with_weight_decay():
    """Two steps by hand with torch's rule: b = m*b + (g + wd*p); p -= lr*b (every parameter)."""
    cfg = get_config("mobilenet0.25")
    lr = 0.1
    tx = make_optimizer(cfg, lr)
    params = {"w": jnp.array([1.0, -2.0]), "bn_scale": jnp.array([0.5])}
    grads = [{"w": jnp.array([0.3, 0.1]), "bn_scale": jnp.array([-1.0])}] * 2
    opt_state = tx.init(params)
    p_ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p_ref.items()}
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        for k in p_ref:
            buf[k] = cfg.momentum * buf[k] + (np.asarray(g[k]) + cfg.weight_decay * p_ref[k])
            p_ref[k] = p_ref[k] - lr * buf[k]
    for k in p_ref:
        np.testing.assert_allclose(params[k], p_ref[k], rtol=1e-6)


# --- step --------------------------------------------------------------------------------------


def test_step_lowers_loss_and_updates_batch_stats():
    batch = make_batches(1)
    metrics, params, stats = run_steps(jax.devices()[:1], batch * 3)
    losses = [m["loss"] for m in metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert metrics[0]["lr"] == pytest.approx(1e-3)
    total = 2.0 * metrics[0]["loss_l"] + metrics[0]["loss_c"] + metrics[0]["loss_landm"]
    assert metrics[0]["loss"] == pytest.approx(total, rel=1e-6)
    # running statistics moved away from their initial (0, 1)
    assert float(np.abs(stats["stem_bn"]["mean"]).max()) > 0
    assert not np.allclose(stats["stem_bn"]["var"], 1.0)


def test_uint8_images_train_as_float32_minus_the_mean():
    """The pipeline's uint8 batches: the step subtracts ``rgb_mean`` in float32, as the original
    does before its batches reach the model, so the step is the same bit for bit."""
    cfg = tiny_cfg()
    (batch,) = make_batches(1, seed=2)
    u8 = np.random.default_rng(3).integers(0, 256, batch["image"].shape, dtype=np.uint8)
    minus_mean = u8.astype(np.float32) - np.asarray(cfg.rgb_mean, np.float32)
    m_u8, p_u8, s_u8 = run_steps(jax.devices()[:1], [dict(batch, image=u8)])
    m_f, p_f, s_f = run_steps(jax.devices()[:1], [dict(batch, image=minus_mean)])
    assert m_u8 == m_f
    assert_trees_close(p_u8, p_f, rtol=0, atol=0)
    assert_trees_close(s_u8, s_f, rtol=0, atol=0)


def test_kernels_argument_chooses_what_runs_the_step():
    """``kernels='xla'`` keeps every convolution and the matching on XLA, ``'native'`` runs them
    on the native kernels, ``'reference'`` differentiates the plain model (lowered on a
    ``RetinaFace``); the two CPU paths train the stand-in to the same numbers."""
    from retinaface_jax.train.step import train_kernels

    cfg = tiny_cfg()
    tx = make_optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch=100))
    graphdef, state = create_train_state(RetinaFace(cfg, rngs=nnx.Rngs(0)), tx)
    (batch,) = make_batches(1)
    for kernels, native in (("xla", False), ("native", True), ("auto", True), ("reference", False)):
        step = make_train_step(graphdef, cfg, SIZE, tx, donate=False, kernels=kernels)
        text = step.lower(state, batch).as_text()
        assert ("@retinaface_conv" in text) is native, kernels
        assert ("@retinaface_match_overlaps(" in text) is native, kernels
    runs = {k: run_steps(jax.devices()[:1], [batch] * 2, kernels=k) for k in ("xla", "native")}
    for a, b in zip(runs["xla"][0], runs["native"][0], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert_trees_close(runs["xla"][1], runs["native"][1], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="kernels: expected one of"):
        train_kernels("fast", "cpu")
    with pytest.raises(RuntimeError, match="CPU only, not tpu"):
        train_kernels("native", "tpu")
    assert train_kernels("auto", "tpu") == train_kernels("xla", "gpu") == "reference"
    assert train_kernels("xla", "cpu") == "xla"


def test_four_devices_match_one_device():
    """Same loss, parameters and BatchNorm statistics on a 4-device mesh as on 1 device."""
    assert len(jax.devices()) >= 4, "conftest must configure 4 CPU devices"
    batches = make_batches(2)
    m1, p1, s1 = run_steps(jax.devices()[:1], batches)
    m4, p4, s4 = run_steps(jax.devices()[:4], batches)
    for a, b in zip(m1, m4, strict=True):
        for k in ("loss", "loss_l", "loss_c", "loss_landm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert_trees_close(p1, p4)
    assert_trees_close(s1, s4)


@pytest.mark.slow
def test_four_devices_match_one_device_real_model():
    """The same with the real RetinaFace (mobilenet0.25) for one step, in float64.

    In float32 the two runs differ by summation order (per-device partial sums, then an
    all-reduce), and BatchNorm's gradient amplifies that rounding through heavy cancellation: up
    to ~2e-4 on parameters after one step. In float64 the data-parallel program must compute the
    same function as the single-device one, which is what this test asserts (it matches ~1e-11).
    """
    from retinaface_jax.models.retinaface import RetinaFace

    cfg = tiny_cfg()
    with jax.enable_x64(True):
        batches = [
            {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in b.items()}
            for b in make_batches(1, seed=1)
        ]

        def make():
            model = RetinaFace(cfg, rngs=nnx.Rngs(0))
            nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
            return model

        m1, p1, s1 = run_steps(jax.devices()[:1], batches, make, cfg)
        m4, p4, s4 = run_steps(jax.devices()[:4], batches, make, cfg)
    assert jax.tree.leaves(p1)[0].dtype == np.float64
    assert m1[0]["loss"] == pytest.approx(m4[0]["loss"], rel=1e-5)
    assert_trees_close(p1, p4)
    assert_trees_close(s1, s4)


def test_priors_match_tiny_detector_layout():
    cfg = tiny_cfg()
    model = TinyDetector(cfg, rngs=nnx.Rngs(0))
    loc, conf, landm = model(jnp.zeros((1, SIZE, SIZE, 3)))
    assert loc.shape[1] == prior_box(cfg, (SIZE, SIZE)).shape[0]
    assert conf.shape[-1] == 2 and landm.shape[-1] == 10


def test_every_path_gives_the_reference_loss_gradients_and_statistics():
    """One ``RetinaFace`` loss evaluation on each path: the planned CPU paths (fused layers with
    custom VJPs, native kernels) against the plain model differentiated by JAX. At this random
    initialisation float32 rounding moves a few early BatchNorm scale gradients by ~1-2 % of the
    leaf's largest (the two CPU paths differ from each other by as much), hence 4e-2 there."""
    import contextlib

    from retinaface_jax.backends.native.build import native_kernels_available
    from retinaface_jax.backends.native.native_training import native_gradients
    from retinaface_jax.train.step import make_loss_fn

    assert native_kernels_available()
    cfg = tiny_cfg()
    graphdef, params, stats = nnx.split(RetinaFace(cfg, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    (batch,) = make_batches(1)
    results = {}
    for kernels in ("reference", "xla", "native"):
        grad_fn = jax.value_and_grad(
            make_loss_fn(graphdef, cfg, SIZE, kernels=kernels), has_aux=True
        )

        def run(p, s, b, grad_fn=grad_fn, native=kernels == "native"):
            with native_gradients() if native else contextlib.nullcontext():
                return grad_fn(p, s, b)

        (value, (new_stats, parts)), grads = jax.jit(run)(params, stats, batch)
        results[kernels] = to_host((value, new_stats, parts, grads))
    ref = results["reference"]
    for kernels in ("xla", "native"):
        value, new_stats, parts, grads = results[kernels]
        assert value == pytest.approx(ref[0], rel=1e-5), kernels
        for k in parts:
            assert parts[k] == pytest.approx(ref[2][k], rel=1e-5, abs=1e-6), (kernels, k)
        assert_trees_close(ref[1], new_stats, rtol=1e-4, atol=1e-5)
        flat = jax.tree_util.tree_flatten_with_path(ref[3])[0]
        for (path, a), b in zip(flat, jax.tree.leaves(grads), strict=True):
            scale = float(np.abs(a).max()) + 1e-12
            where = (kernels, jax.tree_util.keystr(path))
            np.testing.assert_allclose(b, a, rtol=0, atol=4e-2 * scale, err_msg=str(where))
