"""``python train.py``: argparse -> config (preset from ``configs/`` + overrides) -> training loop.

Examples::

    python train.py --backbone mobilenet --data data/widerface/train/label.txt
    python train.py --backbone resnet50 --workdir runs/re50 --resume
    # multi-host (run on every host; process i of N):
    python train.py --backbone resnet50 --coordinator HOST0:1234 --num-processes N --process-id i
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retinaface_jax.backends.native.build import TRAIN_KERNEL_CHOICES  # (stdlib only: cheap)
from retinaface_jax.cli_errors import add_debug_flag, run_cli

if TYPE_CHECKING:
    from retinaface_jax.config import RetinaFaceConfig

PROG = "train.py"
DEFAULT_DATA = "./data/widerface/train/label.txt"
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130
GET_DATA = """\
WIDER FACE is not included. Download the training images (WIDER_train.zip) from the
WIDER FACE site (http://shuoyang1213.me/WIDERFACE/) and the RetinaFace annotations
(train/label.txt, with five landmarks per face) linked from the README of the original
Pytorch_Retinaface project (github.com/biubug6/Pytorch_Retinaface); lay them out as
    data/widerface/train/label.txt
    data/widerface/train/images/<event>/<name>.jpg    (e.g. images/0--Parade/0_Parade_...jpg)
or pass --data PATH/label.txt: the images are read from images/ beside it, at the paths
its '# <event>/<name>.jpg' lines give."""


def _number(
    kind: Callable[[str], float], minimum: float, bound: str = "positive"
) -> Callable[[str], float]:
    """An argparse type: ``kind(text)``, finite and >= ``minimum`` (described as ``bound``),
    else a one-line error."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
NON_NEGATIVE_INT = _number(int, 0, ">= 0")
POSITIVE_FLOAT = _number(float, sys.float_info.min)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train RetinaFace (the original's recipe) on WIDER FACE with JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="mobilenet0.25", help="mobilenet0.25 | resnet50")
    p.add_argument("--config", help="a config TOML instead of the backbone's preset")
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="label.txt or wider_face_*_bbx_gt.txt, with the images in images/ beside it",
    )
    p.add_argument(
        "--image-size", type=_number(int, 32, ">= 32"), help="training size (config: image_size)"
    )
    p.add_argument("--batch-size", type=POSITIVE_INT, help="GLOBAL batch size (config: batch_size)")
    p.add_argument("--epochs", type=POSITIVE_INT, help="config: epochs")
    p.add_argument(
        "--max-steps", type=POSITIVE_INT, help="stop after this many steps (schedule unchanged)"
    )
    p.add_argument("--lr", type=POSITIVE_FLOAT, help="initial learning rate (config: lr)")
    p.add_argument("--workdir", help="checkpoints, metrics.jsonl, export/ (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="initialisation and data order")
    p.add_argument(
        "--pretrained",
        help="ImageNet backbone file ('none': random init; default: search ./weights, the cache)",
    )
    p.add_argument("--init-weights", help="full RetinaFace weights to fine-tune (.pth or dir)")
    p.add_argument(
        "--checkpoint-every", type=POSITIVE_INT, default=1000, help="steps between checkpoints"
    )
    p.add_argument("--keep", type=POSITIVE_INT, default=3, help="checkpoints to keep")
    p.add_argument(
        "--num-workers", type=NON_NEGATIVE_INT, default=2, help="data loading processes (0: none)"
    )
    p.add_argument(
        "--max-faces", type=POSITIVE_INT, help="padded faces per image (default: data module's)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the final native export")
    p.add_argument(
        "--kernels",
        choices=TRAIN_KERNEL_CHOICES,
        default="auto",
        help="what runs the model: auto (on CPU our native kernels when they build, else XLA; "
        "elsewhere the reference), native (required; CPU), xla (XLA's CPU formulations), "
        "reference (the plain model as JAX differentiates it; what GPU/TPU run)",
    )
    dist = p.add_argument_group("multi-host (jax.distributed)")
    dist.add_argument("--coordinator", help="host:port of process 0")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    dist.add_argument(
        "--distributed", action="store_true", help="auto-detect the cluster (TPU, SLURM, MPI)"
    )
    add_debug_flag(p)
    return p


def check_data(data: Path) -> None:
    """A clear error, saying where WIDER FACE comes from, when ``--data`` is not a file."""
    if data.is_dir():
        inside = data / "label.txt"
        hint = f" (did you mean --data {inside}?)" if inside.is_file() else ""
        raise FileNotFoundError(
            f"--data {data}: is a directory; pass the annotation file itself{hint}"
        )
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such annotation file.\n{GET_DATA}")


def check_workdir(workdir: Path) -> None:
    """``--workdir`` must be (or become) a directory."""
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f"--workdir {workdir}: exists and is not a directory")


def load_config(name_or_path: str, overrides: dict[str, Any]) -> RetinaFaceConfig:
    """The preset or TOML config with overrides; a malformed TOML file names itself."""
    from retinaface_jax.config import get_config

    try:
        return get_config(name_or_path, **overrides)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {name_or_path}: not valid TOML ({e})") from e


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drop orbax's (absl) and JAX's informational chatter; keep their warnings."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("absl", "jax"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python train.py``: user errors are one line on stderr (see ``cli_errors``)."""
    return run_cli(PROG, _main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "lr": args.lr,
        }.items()
        if v is not None
    }
    cfg = load_config(args.config or args.backbone, overrides)
    check_data(Path(args.data))
    workdir = Path(args.workdir or Path("runs") / cfg.name)
    check_workdir(workdir)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    # first JAX call of the process: join the cluster before anything touches the devices
    from retinaface_jax.train.sharding import initialize_distributed

    initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, auto=args.distributed
    )

    from retinaface_jax.data.targets import DEFAULT_MAX_FACES
    from retinaface_jax.inference.compile_cache import enable_compilation_cache
    from retinaface_jax.train.loop import RunOptions, train

    enable_compilation_cache()
    opts = RunOptions(
        workdir=workdir,
        data=Path(args.data),
        max_steps=args.max_steps,
        resume=args.resume,
        seed=args.seed,
        pretrained=args.pretrained,
        init_weights=args.init_weights,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep,
        num_workers=args.num_workers,
        max_faces=args.max_faces or DEFAULT_MAX_FACES,
        progress=not args.no_progress,
        export=not args.no_export,
        kernels=args.kernels,
    )
    result = train(cfg, opts)
    if result.status == "nonfinite":
        return EXIT_NONFINITE
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    where = f"; model exported to {result.export_dir}" if result.export_dir else ""
    print(f"done: step {result.step} in {workdir}{where}")
    return 0
