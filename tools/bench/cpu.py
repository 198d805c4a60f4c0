"""The benchmark's CPU mode: the serving layer against plain diffusers, measured side by side in the same run, on
the tiny and mid-size SDXL shapes (random weights)."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sdxl.inference.generation import generate
from sdxl.inputs.request import REFINE_MODES, GenerationRequest
from sdxl.model import weights
from sdxl.model.loading import load_pipelines
from sdxl.model.random_weights import write_random_weights
from sdxl.model.random_weights.architectures import ARCHITECTURES
from tools.bench.measure import (
    expected_unet_calls,
    lora_switcher,
    on_compute,
    side_by_side,
    timed,
    two_cached_loras,
    unet_counter,
)

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("benchmark")


# --- baselines: plain diffusers, written as its docs show ---------------------------------------------------------


def plain_from_pretrained(root: Path, dtype, device):
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    variant = "fp16" if any((root / weights.BASE.folder / "unet").glob("*.fp16.*")) else None
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder, dtype=dtype)
    base = StableDiffusionXLPipeline.from_pretrained(
        root / weights.BASE.folder, vae=vae, dtype=dtype, variant=variant, add_watermarker=False
    ).to(device)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        root / weights.REFINER.folder,
        vae=vae,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        dtype=dtype,
        variant=variant,
        add_watermarker=False,
    ).to(device)
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(root / weights.SAFETY_CHECKER.folder, dtype=dtype).to(device)
    CLIPImageProcessor.from_pretrained(root / weights.SAFETY_CHECKER.folder)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner, checker


def direct_call(pipe, request: GenerationRequest):
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=request.num_outputs,
        width=request.width,
        height=request.height,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images


# --- the measurements-----------------------------------------------------------------------------------------------


def measure_setup(root: Path, repeats: int, warmup: int) -> dict:
    placement = load_pipelines(root).placement
    return side_by_side(
        on_compute(lambda: load_pipelines(root, placement=placement)),
        on_compute(lambda: plain_from_pretrained(root, placement.dtype, placement.device)),
        repeats,
        warmup,
    )


def predictor_inputs(request: GenerationRequest) -> list[str]:
    return [
        f"width={request.width}",
        f"height={request.height}",
        f"num_inference_steps={request.num_inference_steps}",
        f"seed={request.seed}",
        f"apply_watermark={str(request.apply_watermark).lower()}",
        f"disable_safety_checker={str(request.disable_safety_checker).lower()}",
    ]


def cog_predict_script():
    """scripts/cog_predict.py (a command, not a package module): its resolve_inputs completes inputs as Cog does."""
    from tools.testing.modules import load_file

    return load_file("cog_predict", ROOT / "scripts" / "cog_predict.py")


def measure_generation(runner, baseline_pipe, request: GenerationRequest, repeats: int, warmup: int) -> dict:
    """The predictor's whole run() (validation, generation, PNG files) with safety checker and watermark off, so it
    does the same work as the plain diffusers call; then the same with both on, to show what they cost."""
    resolve_inputs = cog_predict_script().resolve_inputs

    bare = GenerationRequest(**{**request.__dict__, "apply_watermark": False, "disable_safety_checker": True})
    bare_kwargs = resolve_inputs(predictor_inputs(bare))
    result = side_by_side(
        lambda: runner.run(**bare_kwargs), on_compute(lambda: direct_call(baseline_pipe, bare)), repeats, warmup
    )
    full_kwargs = resolve_inputs(predictor_inputs(request))
    result["with_safety_and_watermark_s"] = statistics.median(timed(lambda: runner.run(**full_kwargs), repeats))
    return result


def measure_http(root: Path, runner, request: GenerationRequest, repeats: int, warmup: int) -> dict:
    """A sync POST /predictions through the real Cog server vs the same run() in process."""
    resolve_inputs = cog_predict_script().resolve_inputs

    from tools.testing.cog_server import CogServer

    kwargs = resolve_inputs(predictor_inputs(request))
    body = {key: value for key, value in kwargs.items() if value is not None}
    with tempfile.TemporaryDirectory() as tmp:
        server = CogServer(root, Path(tmp) / "server.log")
        try:
            server.wait_for("READY", timeout=300)

            def predict():  # coglet frees its slot ~2 ms after it answers: the 409 retry counts, as for a client
                response = server.predict(body, busy_retry_s=60)
                assert response.json()["status"] == "succeeded", response.text

            result = side_by_side(predict, lambda: runner.run(**kwargs), repeats, warmup)
        finally:
            server.stop()
    result["added_ms"] = (result["ours_s"] - result["baseline_s"]) * 1000
    return result


def measure_unet_calls(pipes, size: int, steps: int) -> list[dict]:
    rows = []
    for refine in REFINE_MODES:
        request = GenerationRequest(width=size, height=size, num_inference_steps=steps, refine=refine, seed=0)
        with unet_counter(pipes) as counts:
            generate(pipes, request)
        rows.append({"refine": refine, "counted": dict(counts), "expected": expected_unet_calls(request)})
    return rows


def measure_lora_switch(pipes, baseline_pipe, repeats: int, warmup: int) -> dict:
    """Switching between two LoRAs the predictor already holds vs diffusers' plain load_lora_weights from local disk
    (plus unloading it again, so every baseline round starts from the same state)."""
    with two_cached_loras(pipes) as (adapters, requests, files):

        def plain_load():
            baseline_pipe.load_lora_weights(str(files[1]), adapter_name="plain")
            baseline_pipe.delete_adapters("plain")

        switch = on_compute(lora_switcher(adapters, requests))
        return side_by_side(switch, on_compute(plain_load), repeats * 4, warmup)


def peak_rss_probe(root: Path, what: str) -> subprocess.Popen:
    """A fresh process that loads `what` (base only, or everything) and prints its peak resident memory in MB."""
    code = f"""
from pathlib import Path
if {what!r} == "base":
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from sdxl.model import weights
    root = Path({str(root)!r})
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / weights.BASE.folder, vae=vae, add_watermarker=False)
    modules = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet]
else:
    from sdxl.model.loading import load_pipelines
    pipes = load_pipelines({str(root)!r})
    base = pipes.text2img
    modules = [base.vae, base.text_encoder, base.text_encoder_2, base.unet, pipes.refiner.unet, pipes.safety_checker]
# Touch every weight: memory-mapped files only become resident when read, as the first request would read them.
for module in modules:
    for tensor in module.state_dict().values():
        tensor.float().sum()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def peak_rss_mb(probe: subprocess.Popen) -> float:
    out, err = probe.communicate()
    if probe.returncode:
        raise RuntimeError(f"the memory probe failed: {err[-2000:]}")
    return float(out.strip().splitlines()[-1])


def measure_memory(root: Path, pipes) -> dict:
    refiner_unet_mb = sum(p.numel() * p.element_size() for p in pipes.refiner.unet.parameters()) / 2**20
    # Each probe measures its own process's peak, so the two run side by side.
    base_mb, all_mb = map(peak_rss_mb, [peak_rss_probe(root, "base"), peak_rss_probe(root, "all")])
    budget = (base_mb + refiner_unet_mb) * 1.10
    return {
        "base_only_mb": base_mb,
        "base_refiner_checker_mb": all_mb,
        "refiner_unet_mb": refiner_unet_mb,
        "budget_mb": budget,
        "within_budget": all_mb <= budget,
    }


# --- the mode ------------------------------------------------------------------------------------------------------


def cpu_mode(args) -> dict:
    report = {"mode": "cpu", "architectures": {}}
    sizes = {"tiny": (128, 4), "mid": (256, 4)}  # (side, steps); --smoke: 64 px, 2 steps
    warmup = 0 if args.smoke else 1
    for arch_name in args.architectures:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_random_weights(Path(tmp), ARCHITECTURES[arch_name])
            os.environ[weights.WEIGHTS_DIR_ENV] = str(root)
            from predict import Runner

            runner = Runner()
            runner.setup()
            pipes = runner.pipes
            baseline_pipe, _, _ = plain_from_pretrained(root, torch.float32, torch.device("cpu"))
            size, steps = (64, 2) if args.smoke else sizes[arch_name]
            request = GenerationRequest(width=size, height=size, num_inference_steps=steps, seed=0)
            log.info("%s: measuring setup, generation, HTTP, UNet calls, memory", arch_name)
            report["architectures"][arch_name] = {
                "size": size,
                "steps": steps,
                "setup": measure_setup(root, args.repeats, warmup),
                "generation": measure_generation(runner, baseline_pipe, request, args.repeats, warmup),
                "http": measure_http(root, runner, request, args.repeats, warmup),
                "lora_switch": measure_lora_switch(pipes, baseline_pipe, args.repeats, warmup),
                "unet_calls": measure_unet_calls(pipes, size, 4 if args.smoke else 10),
                "memory": measure_memory(root, pipes),
            }
    return report


def _rows(name: str, r: dict) -> list[str]:
    lines = []
    g, s = r["generation"], r["setup"]
    lines.append(
        f"| {name} | request {r['size']}px {r['steps']} steps | {g['ours_s']:.3f} s | {g['baseline_s']:.3f} s"
        f" | {g['ratio']:.3f} | <= 1.03 |"
    )
    lines.append(f"| {name} | + safety checker + watermark | {g['with_safety_and_watermark_s']:.3f} s | | | |")
    lines.append(
        f"| {name} | setup vs from_pretrained | {s['ours_s']:.3f} s | {s['baseline_s']:.3f} s"
        f" | {s['ratio']:.3f} | <= 1.10 |"
    )
    h = r["http"]
    lines.append(
        f"| {name} | HTTP POST vs in-process run() | {h['ours_s']:.3f} s | {h['baseline_s']:.3f} s"
        f" | {h['added_ms']:+.0f} ms | <= +30 ms |"
    )
    lo = r["lora_switch"]
    lines.append(
        f"| {name} | switch to a cached LoRA vs load_lora_weights | {lo['ours_s'] * 1000:.1f} ms"
        f" | {lo['baseline_s'] * 1000:.1f} ms | {lo['ratio']:.3f} | <= 1.00 |"
    )
    m = r["memory"]
    lines.append(
        f"| {name} | peak RSS base+refiner+checker | {m['base_refiner_checker_mb']:.0f} MiB"
        f" | base {m['base_only_mb']:.0f} MiB + refiner UNet {m['refiner_unet_mb']:.0f} MiB"
        f" | {m['base_refiner_checker_mb'] / (m['base_only_mb'] + m['refiner_unet_mb']):.3f} | <= 1.10 |"
    )
    for row in r["unet_calls"]:
        ok = "ok" if row["counted"] == row["expected"] else "MISMATCH"
        lines.append(
            f"| {name} | UNet calls {row['refine']} (10 steps) | {row['counted']} | expected"
            f" {row['expected']} | {ok} | equal |"
        )
    return lines


def markdown(report: dict) -> str:
    lines = [f"Benchmark (cpu), {report['machine']}, {report['date']}", ""]
    lines += ["| model | measure | ours | plain diffusers | ratio | target |", "|---|---|---|---|---|---|"]
    for name, r in report["architectures"].items():
        lines += _rows(name, r)
    return "\n".join(lines)
