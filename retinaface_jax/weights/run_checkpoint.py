"""Orbax checkpoints of a training run: ``WORKDIR/checkpoints/<step>/{state,meta}``.

Written by the train loop, read by it to resume and by ``load_model(WORKDIR)`` (which is why they
live with the other weight formats, below both). ``state`` is the whole train state (a
``train.state.TrainState``: parameters, optimiser state, BatchNorm statistics, step, RNG); ``meta`` is JSON with the data position, seed and the
full config, so a run can resume exactly and a model can be rebuilt from a workdir alone. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed at any
moment leaves only whole checkpoints (stale temporaries are removed on the next start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from retinaface_jax.config import RetinaFaceConfig, from_dict
from retinaface_jax.models.retinaface import abstract_model

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | Path) -> Path:
    """Where a run in ``workdir`` keeps its checkpoints."""
    return Path(workdir).resolve() / CHECKPOINT_SUBDIR


class Checkpoints:
    """Save every ``every_steps`` steps (and whenever forced), keep the last ``keep``."""

    def __init__(
        self,
        workdir: str | Path,
        every_steps: int = 1000,
        keep: int = 3,
        *,
        read_only: bool = False,
        asynchronous: bool = True,
    ):
        if every_steps <= 0 or keep <= 0:
            raise ValueError(
                f"checkpoint every_steps and keep must be positive, got {every_steps}, {keep}"
            )
        self.directory = checkpoint_dir(workdir)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no checkpoints of a training run here")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            enable_async_checkpointing=asynchronous,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        """Save at ``state.step`` when due (or ``force``); returns whether a save started.

        Saving is asynchronous: arrays are copied off the devices, then written in the background.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})
        )
        return self.manager.save(step, args=args, force=force)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON meta of a checkpoint (config, seed, data position), without arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The checkpoint at ``step`` (default latest) shaped and placed like ``target``."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        return self._restore(step, lambda _: abstract)

    def restore_arrays(self, step: int | None = None) -> tuple[dict, dict]:
        """The raw saved pytree (on this process's first device, any topology) and its meta."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def abstract(step: int) -> Any:
            saved = self.manager.item_metadata(step)["state"]
            return jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
            )

        return self._restore(step, abstract)

    def _restore(self, step: int | None, abstract: Any) -> tuple[Any, dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(step)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.meta)

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        self.manager.wait_until_finished()
        self.manager.close()


def is_training_workdir(path: str | Path) -> bool:
    """True when ``path`` holds checkpoints written by :class:`Checkpoints`."""
    return checkpoint_dir(path).is_dir()


def load_checkpoint_variables(
    workdir: str | Path, step: int | None = None
) -> tuple[RetinaFaceConfig, dict, dict, int]:
    """``(cfg, params, batch_stats, step)`` of a run's latest (or given) checkpoint.

    ``params`` / ``batch_stats`` are numpy pytrees as saved (dict keys are strings, list indices
    included); :func:`restore_model_state` turns them into a model's state.
    """
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        tree, meta = ckpts.restore_arrays(step)
    finally:
        ckpts.close()
    if "config" not in meta:
        raise ValueError(f"{ckpts.directory}: checkpoint meta has no 'config' field")
    cfg = from_dict(meta["config"], source=f"{ckpts.directory} meta")
    host = jax.tree.map(np.asarray, (tree["params"], tree["batch_stats"]))
    return cfg, host[0], host[1], int(meta["step"])


def restore_model_state(
    workdir: str | Path, step: int | None = None
) -> tuple[RetinaFaceConfig, dict[str, Any]]:
    """``(cfg, state)``: the pure dict of ``nnx.state(RetinaFace(cfg))`` from a run's checkpoint.

    This is how ``load_model(WORKDIR)`` loads the latest checkpoint of a training run.
    """
    cfg, params, batch_stats, _ = load_checkpoint_variables(workdir, step)
    saved = {**_flat(params), **_flat(batch_stats)}
    template = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    missing = []

    def pick(path: tuple, leaf: Any) -> Any:
        key = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if key not in saved:
            missing.append("/".join(key))
            return leaf
        return saved[key]

    state = jax.tree_util.tree_map_with_path(pick, template)
    if missing or len(saved) != len(jax.tree.leaves(template)):
        raise ValueError(
            f"{checkpoint_dir(workdir)}: checkpoint does not fit a {cfg.backbone} RetinaFace "
            f"(missing {missing[:5]}, {len(saved)} saved arrays vs "
            f"{len(jax.tree.leaves(template))} expected)"
        )
    return cfg, state


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        return {(str(k), *p): v for k, sub in tree.items() for p, v in _flat(sub).items()}
    return {(): tree}
