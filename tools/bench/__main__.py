"""Benchmark the serving layer.

    python -m tools.bench --mode cpu                     # any machine, a few minutes: ours vs plain diffusers
    python -m tools.bench --mode cpu --smoke --architectures tiny  # every part once on the least work (tests)
    python -m tools.bench --mode gpu --budget-s 420      # CUDA: full-size SDXL shapes, random weights, rows in
                                                               # order of importance within the budget
    python -m tools.bench --mode gpu --smoke --arch mid  # the GPU mode's code on CPU (tiny or mid shapes)

CPU mode writes a markdown table to stdout and the numbers as JSON (--json, default benchmark-cpu.json). GPU mode
writes benchmark-gpu.{json,jsonl,md} into --out (default $OUT, else the current folder) after every row, and prints
the table last. On a lent GPU machine run `bash scripts/device_benchmark.sh` instead: it installs the carried wheels
and checks the stack first (docs/PERFORMANCE.md). Random weights give real timings for real shapes without any
download; the images are noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measure (cpu 5, gpu 3)")
    parser.add_argument(
        "--smoke", action="store_true", help="the code on the least work: cpu 64 px, 2 steps, no warm-up; gpu on CPU"
    )
    cpu = parser.add_argument_group("cpu mode")
    cpu.add_argument("--architectures", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid"))
    cpu.add_argument("--json", type=Path, default=None)
    gpu = parser.add_argument_group("gpu mode")
    gpu.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for every step together")
    gpu.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for benchmark-gpu.{json,jsonl,md}")
    gpu.add_argument("--weights-dir", default=None, help="write the random weights here once and reuse them")
    gpu.add_argument("--rows", nargs="+", default=None, choices=("1", "2", "3", "4", "5", "6"), help="a subset")
    gpu.add_argument("--arch", choices=("tiny", "mid", "full"), default=None, help="shapes (default full; smoke tiny)")
    # Test hooks: scale the estimates (0 starts every step), shorten a started step's least allowance, hang a step.
    gpu.add_argument("--estimate-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    gpu.add_argument("--min-allowance-s", type=float, default=30.0, help=argparse.SUPPRESS)
    gpu.add_argument("--stall", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.mode == "cpu" else 3)
    return args


def cpu_main(args) -> None:
    import torch

    from tools.bench.cpu import cpu_mode, markdown

    report = cpu_mode(args)
    report["date"] = date.today().isoformat()
    report["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    report["torch"] = torch.__version__
    (args.json or Path("benchmark-cpu.json")).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sdxl").setLevel(logging.WARNING)
    if args.mode == "cpu":
        cpu_main(args)
        return
    from tools.bench import gpu_run  # no torch in this process: the measuring runs in a child it can stop

    gpu_run.run(args)


if __name__ == "__main__":
    main()
