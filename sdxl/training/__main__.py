"""Train from a shell on a preprocessed folder, in one process or data-parallel:

  python -m sdxl.training --dataset DATA --output-dir OUT --max_train_steps 500 --resolution 1024
  python -m sdxl.training --num-processes 2 --dataset DATA --output-dir OUT      (launches accelerate itself)
  accelerate launch --multi_gpu --num_processes 2 -m sdxl.training --dataset DATA --output-dir OUT

Every trainer input of the API contract is an option of the same name. On CPU, accelerate starts several processes
only with --multi_gpu (its torchrun launcher); the processes then talk through gloo. Rerunning with the same
inputs and output folder resumes from the newest checkpoint there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from sdxl.errors import InputError
from sdxl.model import weights
from sdxl.training.config import TrainingConfig
from sdxl.training.launch import TrainingRun, train_folder


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("", "none") else kind(text)

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdxl.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, required=True, help="preprocessed folder (captions.csv, images, masks)")
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints and trained_model.tar go here")
    parser.add_argument(
        "--weights", type=Path, default=None, help=f"weights folder (default ${weights.WEIGHTS_DIR_ENV})"
    )
    parser.add_argument(
        "--tar", type=Path, default=None, help="where to write the tar (default OUTPUT/trained_model.tar)"
    )
    parser.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (launches accelerate)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints after success")
    parser.add_argument(
        "--no-checkpoints", action="store_true", help="write no checkpoints (the output folder does not persist)"
    )
    # Every TrainingConfig field is an option of its own name, typed from the dataclass. Not transformers'
    # HfArgumentParser: it parses Optional[X] as X, so `--max_train_steps none` (epochs decide) could not be said, and
    # `--mask_target_prompts none` (as launch.py writes None) would become the prompt "none".
    from transformers.hf_argparser import string_to_bool  # true/false, yes/no, t/f, y/n, 1/0

    hints = typing.get_type_hints(TrainingConfig)
    for f in fields(TrainingConfig):
        kind = hints[f.name]
        optional = typing.get_origin(kind) is typing.Union
        base = typing.get_args(kind)[0] if optional else kind
        parse = string_to_bool if base is bool else (_optional(base) if optional else base)
        parser.add_argument(f"--{f.name}", type=parse, default=f.default, help=f"default: {f.default!r}")
    return parser


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, TrainingConfig]:
    """The command line's options, and the trainer inputs among them validated (InputError names the field)."""
    args = _parser().parse_args(argv)
    return args, TrainingConfig(**{f.name: getattr(args, f.name) for f in fields(TrainingConfig)})


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        args, config = parse_command_line(list(sys.argv[1:] if argv is None else argv))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    weights_root = args.weights or weights.weights_dir()
    checkpoints = dict(keep_checkpoints=args.keep_checkpoints, write_checkpoints=not args.no_checkpoints)
    run = TrainingRun(config, args.dataset, weights_root, args.output_dir, tar_path=args.tar, **checkpoints)
    train_folder(run, args.num_processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
