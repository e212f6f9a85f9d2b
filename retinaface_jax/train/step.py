"""One jitted, data-parallel training step: model -> MultiBoxLoss -> gradients -> optax.

The model runs as a pure function of ``(params, batch_stats)`` through its NNX graphdef; the priors
for the (static) training size are a numpy constant baked into the compiled step. Under a
``('data',)`` mesh the state is replicated and the batch sharded, so XLA turns the batch means
(loss normalisation, BatchNorm statistics) into cross-device reductions and the result does not
depend on the number of devices. What runs the model is an argument, ``kernels``: on CPU the
convolutions, their gradients, BatchNorm's sums and the loss's matching run on the native kernels
(``backends.native.native_training``, through ``backends.planned_forward``) with ``'native'`` (and
``'auto'``, when they build), on XLA's CPU formulations with ``'xla'``; ``'reference'`` (what other
platforms run) differentiates the plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from retinaface_jax.backends.native.build import TRAIN_KERNEL_CHOICES, native_kernels_available
from retinaface_jax.backends.native.native_training import match_overlaps, native_gradients
from retinaface_jax.backends.planned_forward import planned_forward
from retinaface_jax.config import RetinaFaceConfig
from retinaface_jax.loss import multibox_loss
from retinaface_jax.models.mean_subtraction import subtract_mean
from retinaface_jax.models.retinaface import RetinaFace
from retinaface_jax.priors import prior_box
from retinaface_jax.train.sharding import data_sharded, replicated
from retinaface_jax.train.state import TrainState, merge_model
from retinaface_jax.xla_options import compiler_options

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def make_loss_fn(
    graphdef: nnx.GraphDef, cfg: RetinaFaceConfig, image_size: int, *, kernels: str = "reference"
) -> Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]:
    """``(params, batch_stats, batch) -> (total, (new_batch_stats, parts))``, pure. ``kernels``
    (resolved, :func:`train_kernels`): ``'reference'`` differentiates ``model(x)`` as it is;
    ``'xla'`` and ``'native'`` run a ``RetinaFace`` through ``backends.planned_forward`` (the fused
    CPU layers with their VJPs; other models as they are); ``'native'`` also takes the matching's overlaps from the native kernel, and must be
    traced inside ``native_gradients``."""
    if kernels not in TRAIN_PATHS:
        raise ValueError(f"make_loss_fn: kernels must be one of {TRAIN_PATHS}, got {kernels!r}")
    priors = np.asarray(prior_box(cfg, (image_size, image_size)))
    best_overlaps = match_overlaps if kernels == "native" else None

    def loss_fn(params: Any, batch_stats: Any, batch: Batch) -> tuple[jax.Array, Any]:
        model = merge_model(graphdef, params, batch_stats)
        x = _model_input(model, batch["image"], cfg.rgb_mean)
        planned = kernels != "reference" and isinstance(model, RetinaFace)
        predictions = planned_forward(model, x) if planned else model(x)
        loss_l, loss_c, loss_landm = multibox_loss(
            predictions, priors, batch["targets"], batch["valid"], cfg, best_overlaps=best_overlaps
        )
        total = cfg.loc_weight * loss_l + loss_c + loss_landm
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        parts = {"loss": total, "loss_l": loss_l, "loss_c": loss_c, "loss_landm": loss_landm}
        return total, (new_stats, parts)

    return loss_fn


def _model_input(model: nnx.Module, image: jax.Array, rgb_mean: tuple[float, ...]) -> jax.Array:
    """A batch's images as the model takes them: uint8 BGR (the pipeline's) becomes float32 minus
    ``rgb_mean``, the original's arithmetic, exact; float32 is already mean-subtracted. A
    ``RetinaFace`` with the same mean takes the uint8 images as they are and subtracts it itself,
    with the same result (inside a native CPU step its stem's kernels read the uint8 image)."""
    if image.dtype != jnp.uint8:
        return image
    if isinstance(model, RetinaFace) and tuple(model.cfg.rgb_mean) == tuple(rgb_mean):
        return image
    return subtract_mean(image, rgb_mean)


TRAIN_PATHS = ("native", "xla", "reference")


def train_kernels(kernels: str, platform: str) -> str:
    """What a train step built with ``kernels`` runs on ``platform`` (its mesh's devices):
    ``'native'`` (the native CPU kernels), ``'xla'`` (the fused CPU layers on XLA) or
    ``'reference'`` (the plain model, differentiated by JAX: what GPU and TPU run, and the one
    path with forward-mode and higher-order derivatives). ``'auto'``: native on CPU when the
    kernels build (else XLA, with the build's warning), reference elsewhere; ``'native'``: the
    kernels are required (CPU only); ``'xla'``: XLA's CPU formulations on CPU, the reference
    elsewhere."""
    if kernels not in TRAIN_KERNEL_CHOICES:
        raise ValueError(f"kernels: expected one of {TRAIN_KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "reference" or platform != "cpu":
        if kernels == "native":
            raise RuntimeError(
                f"kernels='native': the native CPU kernels run on CPU only, not {platform}"
            )
        return "reference"
    if kernels == "xla":
        return "xla"
    usable = native_kernels_available()
    if kernels == "native" and not usable:
        raise RuntimeError(
            "kernels='native': the native CPU kernels are not usable: they did not build"
        )
    return "native" if usable else "xla"


def make_train_step(
    graphdef: nnx.GraphDef,
    cfg: RetinaFaceConfig,
    image_size: int,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    *,
    kernels: str = "auto",
) -> StepFn:
    """The jitted ``step(state, batch) -> (state, metrics)``.

    ``batch``: ``image [B,S,S,3]`` (uint8 BGR as the pipeline gives it, or float32 already minus
    the mean), ``targets [B,M,15]``, ``valid [B,M]``. ``metrics``:
    scalar ``loss`` (``loc_weight * loss_l + loss_c + loss_landm``), its three parts and ``lr``
    (the rate used for this update, when ``schedule`` is given). With ``mesh`` the state is kept
    replicated and the batch is expected sharded along ``'data'``. ``donate`` reuses the input
    state's buffers (do not touch the old state afterwards). ``kernels``: see
    :func:`train_kernels`.
    """
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    path = train_kernels(kernels, platform)
    native = path == "native"
    loss_fn = make_loss_fn(graphdef, cfg, image_size, kernels=path)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        with native_gradients(mesh) if native else contextlib.nullcontext():
            (_, (new_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    # the options of the platform the step runs on: the mesh's devices, else JAX's default backend
    options = compiler_options(platform)
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=options)
    rep, dat = replicated(mesh), data_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, dat),
        out_shardings=(rep, rep),
        donate_argnums=donate_argnums,
        compiler_options=options,
    )
