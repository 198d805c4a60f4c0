"""A training as a batch job (the Kubernetes Job in deploy/kubernetes/training): the same code path as Cog's
POST /trainings (sdxl.training.job.train_from_archive: preprocess the archive, train data-parallel over every
visible GPU with accelerate), writing trained_model.tar to a volume instead of returning it over HTTP.

    python deploy/train_job.py --input-images /data/input_images.zip --config /config/training.json \
        --output /data/out/trained_model.tar

--config is a JSON object with the trainer's inputs (the API contract's names and defaults; checked before any
work). The tar appears at --output only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-images", type=Path, required=True, help="the .zip or .tar of training images")
    parser.add_argument("--config", type=Path, required=True, help="JSON object of trainer inputs")
    parser.add_argument("--output", type=Path, required=True, help="where trained_model.tar goes")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from sdxl.errors import InputError
    from sdxl.model import weights
    from sdxl.training.config import TrainingConfig
    from sdxl.training.job import train_from_archive

    try:
        config = TrainingConfig(**json.loads(args.config.read_text()))
    except (InputError, TypeError, ValueError) as error:
        print(f"error in {args.config}: {error}", file=sys.stderr)
        return 2
    if not args.input_images.is_file():
        print(f"error: --input-images {args.input_images} is not a file", file=sys.stderr)
        return 2
    tar = train_from_archive(config, args.input_images, weights.weights_dir())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".part")
    shutil.copyfile(tar, partial)
    os.replace(partial, args.output)
    shutil.rmtree(tar.parent, ignore_errors=True)
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
