"""What prompt_weighting costs per request, measured side by side with it off in one run (CPU; tiny and mid shapes).

    python -m tools.bench.prompt_weighting_cost [--archs tiny mid] [--repeats 5] [--size 256] [--steps 4]

For each model: the text encoding alone (diffusers' encode_prompt vs compel through sdxl.inputs.prompt_weighting) and whole
requests (generate, no refiner, no safety checker, no watermark), for a short plain prompt, a short weighted one and
a 200-token one. Each timed run parses its prompts afresh (as a new prompt would be). Medians of `--repeats` runs, off and on alternating, after a warm-up; a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
import torch  # noqa: E402

from sdxl.inference.generation import generate  # noqa: E402
from sdxl.inputs import prompt_weighting as pw  # noqa: E402
from sdxl.inputs.request import GenerationRequest  # noqa: E402
from sdxl.model.loading import load_pipelines  # noqa: E402
from sdxl.model.random_weights import write_random_weights  # noqa: E402
from sdxl.model.random_weights.architectures import ARCHITECTURES  # noqa: E402

WORDS = "fox snow river tree house cloud stone bird moon lake road field".split()
PROMPTS = {
    "short plain": "a watercolor fox in the snow",
    "short weighted": "a watercolor (fox)1.4 in the snow, blurry--",
    "200 tokens": " ".join(WORDS[i % len(WORDS)] for i in range(200)),
}


def paired(off, on, repeats: int) -> dict[str, float]:
    """Off and on alternately (this machine is shared: load drifts), after one warm-up each. Medians of wall time
    and of this process's CPU time (all threads), which the other processes' load disturbs less."""
    off(), on()
    samples = {"off": [], "on": []}
    for i in range(repeats):
        for name, fn in (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    result = {}
    for name, pairs in samples.items():
        result[f"{name}_wall"] = statistics.median(p[0] for p in pairs)
        result[f"{name}_cpu"] = statistics.median(p[1] for p in pairs)
    return result


def encoders(pipes, prompt: str):
    pipe = pipes.text2img

    def off():
        with torch.inference_mode():
            pipe.encode_prompt(prompt, negative_prompt="blurry", device=pipe.device, do_classifier_free_guidance=True)

    def on():
        pw.clear_parse_cache()  # a new prompt per request: the parse is part of the cost
        with torch.inference_mode():
            pw.encode_base(pipe, prompt, "blurry")

    return off, on


def requests(pipes, prompt: str, args):
    def run(weighting: bool):
        pw.clear_parse_cache()
        request = GenerationRequest(  # built in the timed part: with weighting its prompts are parsed here
            prompt=prompt,
            negative_prompt="blurry",
            prompt_weighting=weighting,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            seed=1,
            apply_watermark=False,
            disable_safety_checker=True,
        )
        generate(pipes, request)

    return lambda: run(False), lambda: run(True)


def rows_for(arch: str, args) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        pipes = load_pipelines(write_random_weights(Path(folder), ARCHITECTURES[arch]))
    # One request first: it sets the CPU thread settings (sdxl.model.device) that every later call runs under; before it,
    # a tiny encode_prompt measured ~700 ms instead of ~10.
    generate(pipes, GenerationRequest(prompt="warm-up", width=64, height=64, num_inference_steps=1, seed=0))
    rows = []
    for label, prompt in PROMPTS.items():  # off: the same text, read literally (and cut at 77 tokens)
        enc = paired(*encoders(pipes, prompt), args.repeats)
        req = paired(*requests(pipes, prompt, args), args.repeats)
        rows.append(
            f"| {arch} | {label} | {enc['off_wall'] * 1000:.0f} / {enc['off_cpu'] * 1000:.0f} ms "
            f"| {enc['on_wall'] * 1000:.0f} / {enc['on_cpu'] * 1000:.0f} ms "
            f"| {req['off_wall']:.3f} / {req['off_cpu']:.3f} s | {req['on_wall']:.3f} / {req['on_cpu']:.3f} s "
            f"| {req['on_wall'] - req['off_wall']:+.3f} / {req['on_cpu'] - req['off_cpu']:+.3f} s |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads, {args.size} px, {args.steps} steps, median of {args.repeats}\n")
    print("Each cell: wall / process CPU time (medians). Off and on alternate run by run.\n")
    print("| model | prompt | encode, off | encode, on | request, off | request, on | request, on - off |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for row in rows_for(arch, args):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
