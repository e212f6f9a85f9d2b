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
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_DATA = "./data/widerface/train/label.txt"
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train RetinaFace (the original's recipe) on WIDER FACE with JAX.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="mobilenet0.25", help="mobilenet0.25 | resnet50")
    p.add_argument("--config", help="a config TOML instead of the backbone's preset")
    p.add_argument("--data", default=DEFAULT_DATA, help="label.txt or wider_face_*_bbx_gt.txt")
    p.add_argument("--image-size", type=int, help="training size (config: image_size)")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (config: batch_size)")
    p.add_argument("--epochs", type=int, help="config: epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (schedule unchanged)")
    p.add_argument("--lr", type=float, help="initial learning rate (config: lr)")
    p.add_argument("--workdir", help="checkpoints, metrics.jsonl, export/ (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--pretrained",
        help="ImageNet backbone file ('none': random init; default: search ./weights, the cache)",
    )
    p.add_argument("--init-weights", help="full RetinaFace weights to fine-tune (.pth or dir)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (0: none)")
    p.add_argument("--max-faces", type=int, help="padded faces per image (default: data module's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-export", action="store_true", help="skip the final native export")
    dist = p.add_argument_group("multi-host (jax.distributed)")
    dist.add_argument("--coordinator", help="host:port of process 0")
    dist.add_argument("--num-processes", type=int)
    dist.add_argument("--process-id", type=int)
    dist.add_argument(
        "--distributed", action="store_true", help="auto-detect the cluster (TPU, SLURM, MPI)"
    )
    return p


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drop orbax's (absl) and JAX's informational chatter; keep their warnings."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("absl", "jax"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

    from retinaface_jax.config import get_config
    from retinaface_jax.data.targets import DEFAULT_MAX_FACES
    from retinaface_jax.inference.compile_cache import enable_compilation_cache
    from retinaface_jax.train.loop import RunOptions, train

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
    try:
        cfg = get_config(args.config or args.backbone, **overrides)
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    workdir = Path(args.workdir or Path("runs") / cfg.name)
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
    )
    if not opts.data.is_file():
        print(f"train.py: --data {opts.data}: no such annotation file", file=sys.stderr)
        return 2
    try:
        result = train(cfg, opts)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if result.status == "nonfinite":
        return EXIT_NONFINITE
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    where = f"; model exported to {result.export_dir}" if result.export_dir else ""
    print(f"done: step {result.step} in {workdir}{where}")
    return 0
