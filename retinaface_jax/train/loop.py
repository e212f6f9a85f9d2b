"""The training loop: data -> sharded batch -> jitted step -> metrics, checkpoints, export.

One readable loop in the big_vision manner. Everything that must survive a restart (parameters,
optimiser and BatchNorm state, step, RNG, data position, seed, config) is in the checkpoint, and
the data pipeline is a pure function of the global step, so ``resume=True`` continues exactly
where the last checkpoint left off. A non-finite loss stops the run without saving (the last
good checkpoint stays the newest); Ctrl-C saves the current step and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from retinaface_jax.config import RetinaFaceConfig, dump_config, from_dict
from retinaface_jax.data.labels import FaceRecord, load_training_records
from retinaface_jax.data.pipeline import make_train_iterator, steps_per_epoch
from retinaface_jax.data.targets import DEFAULT_MAX_FACES
from retinaface_jax.train.init import build_model
from retinaface_jax.train.optimizer import make_optimizer
from retinaface_jax.train.schedule import learning_rate_schedule
from retinaface_jax.train.sharding import (
    local_batch_size,
    make_mesh,
    replicate,
    shard_batch,
    to_host,
)
from retinaface_jax.train.state import TrainState, create_train_state, merge_model
from retinaface_jax.train.step import make_train_step
from retinaface_jax.weights.run_checkpoint import Checkpoints

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
EXPORT_SUBDIR = "export"
LOSS_KEYS = ("loss", "loss_l", "loss_c", "loss_landm")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run (as opposed to what to train, which is the config).

    ``data``: a ``label.txt`` / ``wider_face_*_bbx_gt.txt``; ``max_steps`` stops early (the
    schedule still follows ``cfg.epochs``); ``pretrained`` is a backbone file, ``'none'`` or None
    (search); ``init_weights`` full weights to fine-tune; ``kernels``: what runs the model
    (``train.step.train_kernels``: ``'auto'``, ``'native'``, ``'xla'`` or ``'reference'``).
    """

    workdir: Path
    data: Path
    max_steps: int | None = None
    resume: bool = False
    seed: int = 0
    pretrained: str | None = None
    init_weights: str | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    num_workers: int = 2
    max_faces: int = DEFAULT_MAX_FACES
    progress: bool = True
    export: bool = True
    kernels: str = "auto"


@dataclasses.dataclass
class TrainResult:
    """How a run ended: ``status`` is ``'done'``, ``'interrupted'`` or ``'nonfinite'``."""

    status: str
    step: int
    metrics: dict[str, float]
    export_dir: Path | None = None
    message: str = ""


class _StopOnSigint:
    """Turns the first Ctrl-C into a flag checked between steps; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnSigint:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint and exiting (again to abort)")

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _resolve_resume(
    cfg: RetinaFaceConfig, opts: RunOptions, ckpts: Checkpoints
) -> tuple[RetinaFaceConfig, RunOptions, dict | None]:
    """Config and options to run with: a resumed run keeps the saved config and seed."""
    latest = ckpts.latest_step()
    if latest is None:
        if opts.resume:
            log.warning("--resume: no checkpoint in %s yet, starting from step 0", ckpts.directory)
        return cfg, opts, None
    if not opts.resume:
        raise FileExistsError(
            f"{ckpts.directory} already holds checkpoints (latest step {latest}): pass --resume "
            "to continue that run, or choose another --workdir (nothing was overwritten)"
        )
    meta = ckpts.read_meta(latest)
    saved = from_dict(meta["config"], source=f"{ckpts.directory}/{latest} meta")
    saved = saved.replace(epochs=cfg.epochs)  # extending a run is allowed
    changed = {k: v for k, v in cfg.to_dict().items() if saved.to_dict()[k] != v}
    if changed or opts.seed != meta["seed"]:
        log.warning(
            "resuming step %d with the run's saved config and seed %s (ignoring differing "
            "settings: %s)",
            latest,
            meta["seed"],
            sorted(changed) + (["seed"] if opts.seed != meta["seed"] else []),
        )
    opts = dataclasses.replace(opts, seed=int(meta["seed"]))
    return saved, opts, meta


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


def train(cfg: RetinaFaceConfig, opts: RunOptions) -> TrainResult:
    """Train ``cfg`` on ``opts.data`` in ``opts.workdir`` (see the module docstring)."""
    # first, so that an unusable data set is an error before anything is written or started
    records, _ = load_training_records(opts.data)
    workdir = Path(opts.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    ckpts = Checkpoints(workdir, opts.checkpoint_every, opts.keep_checkpoints)
    try:
        cfg, opts, meta = _resolve_resume(cfg, opts, ckpts)
        return _run(cfg, opts, records, workdir, ckpts, meta, is_main)
    finally:
        ckpts.close()


def _run(
    cfg: RetinaFaceConfig,
    opts: RunOptions,
    records: list[FaceRecord],
    workdir: Path,
    ckpts: Checkpoints,
    meta: dict | None,
    is_main: bool,
) -> TrainResult:
    mesh = make_mesh()
    local_batch = local_batch_size(cfg.batch_size, mesh)
    epoch_steps = steps_per_epoch(len(records), cfg.batch_size)
    total_steps = cfg.epochs * epoch_steps
    end_step = total_steps if opts.max_steps is None else min(total_steps, opts.max_steps)

    schedule = learning_rate_schedule(cfg, epoch_steps)
    tx = make_optimizer(cfg, schedule)
    model, how = build_model(
        cfg, seed=opts.seed, pretrained=opts.pretrained, init_weights=opts.init_weights
    )
    graphdef, state = create_train_state(model, tx, opts.seed)
    del model
    state = replicate(state, mesh)
    if meta is not None:
        state, meta = ckpts.restore(state, meta["step"])
        how = f"checkpoint step {meta['step']}"
    start_step = int(to_host(state.step))
    run_meta = {
        "seed": opts.seed,
        "config": cfg.to_dict(),
        "steps_per_epoch": epoch_steps,
        "num_records": len(records),
        "data": str(opts.data),
    }

    metrics_path = workdir / METRICS_FILE
    if is_main:
        (workdir / CONFIG_FILE).write_text(dump_config(cfg))
        _truncate_metrics(metrics_path, start_step)
    log.info(
        "training %s: %d images, %d steps/epoch, global batch %d (%d per process, %d devices), "
        "size %d, steps %d -> %d, start from %s",
        cfg.name,
        len(records),
        epoch_steps,
        cfg.batch_size,
        local_batch,
        mesh.devices.size,
        cfg.image_size,
        start_step,
        end_step,
        how,
    )

    step_fn = make_train_step(
        graphdef, cfg, cfg.image_size, tx, schedule, mesh, kernels=opts.kernels
    )
    batches: Iterator[dict[str, np.ndarray]] = make_train_iterator(
        records,
        cfg,
        batch_size=cfg.batch_size,
        seed=opts.seed,
        start_step=start_step,
        num_steps=end_step,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        num_workers=opts.num_workers,
        max_faces=opts.max_faces,
    )
    bar = tqdm(
        total=end_step,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not (opts.progress and is_main),
    )
    status, message, last = "done", "", {}
    step = start_step
    last_time = time.perf_counter()
    try:
        with _StopOnSigint() as sigint, metrics_path.open("a") as metrics_file:
            for step in range(start_step + 1, end_step + 1):
                batch = shard_batch(next(batches), mesh)
                new_state, metrics = step_fn(state, batch)
                values = {k: float(v) for k, v in to_host(metrics).items()}
                now = time.perf_counter()
                seconds, last_time = now - last_time, now
                if not all(math.isfinite(values[k]) for k in (*LOSS_KEYS, "grad_norm")):
                    status = "nonfinite"
                    ckpts.wait()
                    message = (
                        f"non-finite loss at step {step} ({_fmt(values)}): stopping. The last good "
                        f"checkpoint (step {ckpts.latest_step()}) in {ckpts.directory} is kept; "
                        "resume from it with --resume, or start a new run with a lower --lr"
                    )
                    step -= 1
                    break
                state = new_state
                epoch = (step - 1) // epoch_steps
                values.update(step=step, epoch=epoch, seconds=seconds)
                if step == start_step + 1:
                    log.info("first step (including compilation) took %.1f s", seconds)
                else:
                    values["images_per_s"] = cfg.batch_size / seconds
                last = values
                if is_main:
                    metrics_file.write(json.dumps(values) + "\n")
                    metrics_file.flush()
                bar.set_postfix_str(_fmt(values), refresh=False)
                bar.update(1)
                epoch_end = step % epoch_steps == 0
                ckpts.save(state, {**run_meta, "epoch": epoch}, force=epoch_end or step == end_step)
                if _any_process(sigint.requested):
                    ckpts.save(state, {**run_meta, "epoch": epoch}, force=True)
                    status = "interrupted"
                    message = f"interrupted: saved step {step} in {ckpts.directory}"
                    break
    finally:  # also on an error: stop the data-loader workers, free their shared memory
        bar.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    ckpts.wait()
    if message:
        (log.error if status == "nonfinite" else log.info)("%s", message)
        tqdm.write(message)
    export_dir = None
    if opts.export and status != "nonfinite":
        if jax.process_count() > 1:
            log.info(
                "multi-host run: no separate export; load_model(%s) and detect.py --weights %s "
                "read the latest checkpoint directly",
                workdir,
                workdir,
            )
        else:
            export_dir = export(graphdef, state, cfg, workdir / EXPORT_SUBDIR)
    return TrainResult(status, step, last, export_dir, message)


def _any_process(flag: bool) -> bool:
    """``flag`` or-ed over all processes, so a Ctrl-C on one host stops every host together."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _fmt(values: dict[str, float]) -> str:
    parts = [f"{k}={values[k]:.4f}" for k in LOSS_KEYS[1:]]
    if "lr" in values:
        parts.append(f"lr={values['lr']:.2e}")
    if "images_per_s" in values:
        parts.append(f"img/s={values['images_per_s']:.1f}")
    return " ".join(parts)


def export(graphdef: Any, state: TrainState, cfg: RetinaFaceConfig, out_dir: Path) -> Path:
    """Write the trained model as a native checkpoint (for ``load_model`` / ``detect.py``).

    Replaces an earlier export of the same run (e.g. before the run was extended).
    """
    from retinaface_jax.weights.native import save_native

    model = merge_model(graphdef, to_host(state.params), to_host(state.batch_stats))
    model.eval()
    save_native(model, cfg, out_dir, overwrite=True)
    log.info("exported the trained model to %s", out_dir)
    return Path(out_dir)
