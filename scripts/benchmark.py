"""Benchmark the serving layer against plain diffusers, measured side by side in the same run.

    python scripts/benchmark.py --mode cpu              # any machine, a few minutes: tiny and mid-size SDXL shapes
    python scripts/benchmark.py --mode gpu              # CUDA: full-size SDXL architecture with random weights

Writes a markdown table to stdout and everything measured as JSON (--json, default benchmark-<mode>.json).
Random weights give real timings for real shapes without any download; the images are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from sdxl import weights  # noqa: E402
from sdxl.architectures import ARCHITECTURES  # noqa: E402
from sdxl.compute import on_compute_thread  # noqa: E402
from sdxl.generation import generate  # noqa: E402
from sdxl.loading import load_pipelines  # noqa: E402
from sdxl.request import REFINE_MODES, GenerationRequest  # noqa: E402
from sdxl.tiny_weights import write_random_weights  # noqa: E402

log = logging.getLogger("benchmark")


# --- measuring ---------------------------------------------------------------------------------------------------


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _on_compute_thread(fn):
    return lambda: on_compute_thread(lambda _cancelled: fn())


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def side_by_side(ours, theirs, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of two callables, interleaved so drift (thermal, other load) hits both alike. Both run on the
    compute thread (sdxl.compute), so torch's CPU threads are shared alike (a second thread running torch would
    grow a second OpenMP team and slow both down)."""
    ours, theirs = _on_compute_thread(ours), _on_compute_thread(theirs)
    for _ in range(warmup):
        ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        a += timed(ours, 1)
        b += timed(theirs, 1)
    ours_s, theirs_s = statistics.median(a), statistics.median(b)
    return {"ours_s": ours_s, "baseline_s": theirs_s, "ratio": ours_s / theirs_s}


@contextlib.contextmanager
def unet_counter(pipes):
    counts = {"base": 0, "refiner": 0}

    def bump(key):
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    hooks = [
        pipes.text2img.unet.register_forward_pre_hook(bump("base")),
        pipes.refiner.unet.register_forward_pre_hook(bump("refiner")),
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


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


# --- the measurements ---------------------------------------------------------------------------------------------


def measure_setup(root: Path, repeats: int) -> dict:
    placement = load_pipelines(root).placement
    return side_by_side(
        lambda: load_pipelines(root, placement=placement),
        lambda: plain_from_pretrained(root, placement.dtype, placement.device),
        repeats,
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


def measure_generation(runner, baseline_pipe, request: GenerationRequest, repeats: int) -> dict:
    """The predictor's whole run() (validation, generation, PNG files) with safety checker and watermark off, so it
    does the same work as the plain diffusers call; then the same with both on, to show what they cost."""
    from cog_predict import resolve_inputs

    bare = GenerationRequest(**{**request.__dict__, "apply_watermark": False, "disable_safety_checker": True})
    bare_kwargs = resolve_inputs(predictor_inputs(bare))
    result = side_by_side(lambda: runner.run(**bare_kwargs), lambda: direct_call(baseline_pipe, bare), repeats)
    full_kwargs = resolve_inputs(predictor_inputs(request))
    result["with_safety_and_watermark_s"] = statistics.median(timed(lambda: runner.run(**full_kwargs), repeats))
    return result


def measure_http(root: Path, runner, request: GenerationRequest, repeats: int) -> dict:
    """A sync POST /predictions through the real Cog server vs the same run() in process."""
    from cog_predict import resolve_inputs

    from sdxl.testing.cog_server import CogServer

    kwargs = resolve_inputs(predictor_inputs(request))
    body = {key: value for key, value in kwargs.items() if value is not None}
    with tempfile.TemporaryDirectory() as tmp:
        server = CogServer(root, Path(tmp) / "server.log")
        try:
            server.wait_for("READY", timeout=300)

            def post():
                # coglet frees its slot ~2 ms after answering: a request sent at once gets 409 and is sent again,
                # and that wait counts, as it would for a client.
                while (response := server.predict(body)).status_code == 409:
                    time.sleep(0.001)
                assert response.json()["status"] == "succeeded", response.text

            result = side_by_side(post, lambda: runner.run(**kwargs), repeats)
        finally:
            server.stop()
    result["added_ms"] = (result["ours_s"] - result["baseline_s"]) * 1000
    return result


def expected_unet_calls(request: GenerationRequest) -> dict:
    if request.refine == "no_refiner":
        return {"base": request.num_inference_steps, "refiner": 0}
    if request.refine == "base_image_refiner":
        return {"base": request.num_inference_steps, "refiner": int(request.refiner_steps * 0.3)}
    base = sum(1 for t in leading_timesteps(request.num_inference_steps) if t >= (1 - request.high_noise_frac) * 1000)
    return {"base": base, "refiner": request.num_inference_steps - base}


def leading_timesteps(steps: int) -> list[int]:
    ratio = 1000 // steps
    return [i * ratio + 1 for i in reversed(range(steps))]  # SDXL's "leading" spacing with steps_offset 1


def measure_unet_calls(pipes, size: int) -> list[dict]:
    rows = []
    for refine in REFINE_MODES:
        request = GenerationRequest(width=size, height=size, num_inference_steps=10, refine=refine, seed=0)
        with unet_counter(pipes) as counts:
            generate(pipes, request)
        rows.append({"refine": refine, "counted": dict(counts), "expected": expected_unet_calls(request)})
    return rows


@contextlib.contextmanager
def two_cached_loras(pipes, rank: int = 16):
    """Two rank-`rank` LoRAs served on loopback, fetched and loaded once, so what follows are switches between
    cached LoRAs: yields (adapters, [request for A, request for B], [file A, file B])."""
    from sdxl.adapters import AdapterRequest, Adapters, LoraInput
    from sdxl.testing.trained import lora_state, write_lora
    from sdxl.testing.weights_server import loopback_weights_server
    from sdxl.weights_cache import WeightsCache

    with tempfile.TemporaryDirectory() as tmp, loopback_weights_server() as server:
        files = []
        for seed in (1, 2):
            folder = Path(tmp) / f"lora{seed}"
            folder.mkdir()
            files.append(write_lora(folder, lora_state(pipes.text2img.unet, seed=seed, rank=rank)))
        urls = [server.serve(f"/lora{i}.safetensors", path.read_bytes()) for i, path in enumerate(files)]
        adapters = Adapters(pipes, WeightsCache(Path(tmp) / "cache"))
        requests = [AdapterRequest(loras=(LoraInput(url, 1.0),)) for url in urls]
        for request in requests:
            with adapters.applied(request):
                pass
        yield adapters, requests, files


def lora_switcher(adapters, requests):
    turn = iter(range(10**9))

    def switch():
        with adapters.applied(requests[next(turn) % 2]):
            pass

    return switch


def measure_lora_switch(pipes, baseline_pipe, repeats: int) -> dict:
    """Switching between two LoRAs the predictor already holds vs diffusers' plain load_lora_weights from local disk
    (plus unloading it again, so every baseline round starts from the same state)."""
    with two_cached_loras(pipes) as (adapters, requests, files):

        def plain_load():
            baseline_pipe.load_lora_weights(str(files[1]), adapter_name="plain")
            baseline_pipe.delete_adapters("plain")

        return side_by_side(lora_switcher(adapters, requests), plain_load, repeats * 4)


def peak_rss_mb(root: Path, what: str) -> float:
    """Peak resident memory of a fresh process that loads `what` (base only, or everything)."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
if {what!r} == "base":
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from sdxl import weights
    root = Path({str(root)!r})
    vae = AutoencoderKL.from_pretrained(root / weights.VAE.folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / weights.BASE.folder, vae=vae, add_watermarker=False)
    modules = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.unet]
else:
    from sdxl.loading import load_pipelines
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def measure_memory(root: Path, pipes) -> dict:
    refiner_unet_mb = sum(p.numel() * p.element_size() for p in pipes.refiner.unet.parameters()) / 2**20
    base_mb, all_mb = peak_rss_mb(root, "base"), peak_rss_mb(root, "all")
    budget = (base_mb + refiner_unet_mb) * 1.10
    return {
        "base_only_mb": base_mb,
        "base_refiner_checker_mb": all_mb,
        "refiner_unet_mb": refiner_unet_mb,
        "budget_mb": budget,
        "within_budget": all_mb <= budget,
    }


# --- modes --------------------------------------------------------------------------------------------------------


def cpu_mode(args) -> dict:
    report = {"mode": "cpu", "architectures": {}}
    sizes = {"tiny": (128, 4), "mid": (256, 4)}
    for arch_name in args.architectures:
        with tempfile.TemporaryDirectory() as tmp:
            root = write_random_weights(Path(tmp), ARCHITECTURES[arch_name])
            os.environ[weights.WEIGHTS_DIR_ENV] = str(root)
            from predict import Runner

            runner = Runner()
            runner.setup()
            pipes = runner.pipes
            baseline_pipe, _, _ = plain_from_pretrained(root, torch.float32, torch.device("cpu"))
            size, steps = sizes[arch_name]
            request = GenerationRequest(width=size, height=size, num_inference_steps=steps, seed=0)
            log.info("%s: measuring setup, generation, HTTP, UNet calls, memory", arch_name)
            report["architectures"][arch_name] = {
                "size": size,
                "steps": steps,
                "setup": measure_setup(root, args.repeats),
                "generation": measure_generation(runner, baseline_pipe, request, args.repeats),
                "http": measure_http(root, runner, request, args.repeats),
                "lora_switch": measure_lora_switch(pipes, baseline_pipe, args.repeats),
                "unet_calls": measure_unet_calls(pipes, size),
                "memory": measure_memory(root, pipes),
            }
    return report


H100_DENSE_BF16_TFLOPS = 989.0


def unet_tflop_per_call(pipes, size: int, outputs: int) -> float:
    """TFLOPs of one base UNet call with CFG (batch 2 x outputs) at `size`, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipes.text2img.unet
    config, placement = unet.config, pipes.placement
    batch, side = 2 * outputs, size // pipes.text2img.vae_scale_factor
    pooled = pipes.text2img.text_encoder_2.config.projection_dim

    def tensor(*shape):
        return torch.zeros(*shape, device=placement.device, dtype=placement.dtype)

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(
            tensor(batch, config.in_channels, side, side),
            torch.tensor(500, device=placement.device),
            encoder_hidden_states=tensor(batch, 77, config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": tensor(batch, pooled), "time_ids": tensor(batch, 6)},
        )
    return counter.get_total_flops() / 1e12


FASTPATH_VARIANTS = {
    "default": {},
    "direct_load": {"SDXL_DIRECT_LOAD": "1"},
    "bf16": {"SDXL_DTYPE": "bf16"},
    "vae_upcast": {"SDXL_VAE_UPCAST": "1"},  # the fp32 VAE decode that the fp16-fix VAE makes unnecessary
    "channels_last": {"SDXL_CHANNELS_LAST": "1"},
    "fused_qkv": {"SDXL_FUSE_QKV": "1"},
    "xformers": {"SDXL_ATTENTION": "xformers"},
    "compile": {"SDXL_COMPILE": "1"},  # with LoRA slots of the default rank
    "compile_without_lora_slots": {"SDXL_COMPILE": "1", "SDXL_LORA_SLOT_RANK": "0"},
}


def full_size_mode(args) -> dict:
    """Full-size SDXL shapes with random weights on CUDA (or, with --smoke, the tiny shapes on CPU in seconds).

    --parts picks what to measure, so a run can be split into commands that each fit a time limit; with
    --weights-dir the written weights are kept and reused by the next command."""
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs a CUDA device (use --smoke to try the code path on CPU)")
    cuda = torch.cuda.is_available()
    arch = ARCHITECTURES[args.arch or ("tiny" if smoke else "full")]
    size = {"tiny": 128, "mid": 256, "full": 1024}[arch.name]
    steps_list = (4,) if smoke else tuple(args.steps)
    outputs_list = (1, 2) if smoke else tuple(args.outputs)
    report = {"mode": "gpu", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "runs": []}
    with contextlib.ExitStack() as stack:
        root = random_weights_folder(stack, args, arch, torch.float16 if cuda else torch.float32, report)
        if "runs" in args.parts:
            measure_runs(root, size, steps_list, outputs_list, args, report)
        if "variants" in args.parts:
            report["fastpath_variants"] = measure_fastpath_variants(root, size, steps_list[0], args)
    return report


def random_weights_folder(stack: contextlib.ExitStack, args, arch, dtype, report: dict) -> Path:
    """The full-size random weights: reused from --weights-dir when already written there for `arch`."""
    if args.weights_dir:
        folder = Path(args.weights_dir)
        marker = folder / weights.RANDOM_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("architecture") == arch.name:
            report["write_weights_s"] = None
            return folder
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.scratch)))
    started = time.perf_counter()
    root = write_random_weights(folder, arch, dtype=dtype)
    report["write_weights_s"] = time.perf_counter() - started
    return root


def measure_runs(root: Path, size: int, steps_list, outputs_list, args, report: dict) -> None:
    """Cold start, one UNet call's FLOPs, every (steps, outputs, refine) run, and the LoRA switch, at the defaults."""
    cuda = torch.cuda.is_available()
    load_pipelines(root)  # the files are in the page cache from here on
    if cuda:
        torch.cuda.empty_cache()
    report["cold_start_s"] = timed(lambda: load_pipelines(root), 1)[0]
    pipes = load_pipelines(root)
    report["fastpath"] = pipes.fastpath.describe()
    # Everything loaded (base, refiner, text encoders, VAE, checker): each run's peak is this plus its activations.
    report["loaded_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    report["unet_tflop_per_call"] = unet_tflop_per_call(pipes, size, 1)

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    for steps in steps_list:
        for outputs in outputs_list:
            for refine in REFINE_MODES:
                request = GenerationRequest(
                    width=size, height=size, num_inference_steps=steps, num_outputs=outputs, refine=refine, seed=0
                )
                generate(pipes, request)  # warm-up
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds = statistics.median(timed(lambda r=request: generate(pipes, r), args.repeats))
                calls = expected_unet_calls(request)["base"]
                report["runs"].append(
                    {
                        "steps": steps,
                        "outputs": outputs,
                        "refine": refine,
                        "s_per_image": seconds / outputs,
                        "steps_per_s": steps / seconds,
                        "peak_gib": peak_gib(),
                        "base_unet_tflops": report["unet_tflop_per_call"] * outputs * calls / seconds,
                    }
                )
    report["lora_switch"] = measure_lora_switch(pipes, pipes.text2img, args.repeats)


def measure_fastpath_variants(root: Path, size: int, steps: int, args) -> dict:
    """Each fast-path setting alone, in a fresh load, against the defaults: load time (compile warm-up included),
    seconds per image and the largest pixel difference to the default image (fp noise only is acceptable); where
    the setting takes LoRAs, also the switch between two cached LoRAs and seconds per image with one active."""
    import numpy as np
    import torch._dynamo

    request = GenerationRequest(width=size, height=size, num_inference_steps=steps, seed=0, apply_watermark=False)
    results, reference = {}, None
    for name, env in FASTPATH_VARIANTS.items():
        if args.variants and name not in args.variants and name != "default":
            continue  # the default always runs: it is the reference image and timing
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        pipes = None
        try:
            torch._dynamo.reset()  # each variant compiles from scratch, as in a fresh server
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            started = time.perf_counter()
            pipes = load_pipelines(root)
            sync()
            result = {"load_s": time.perf_counter() - started}
            image = np.asarray(generate(pipes, request).images[0]).astype(int)
            result["s_per_image"] = statistics.median(timed(lambda p=pipes: generate(p, request), args.repeats))
            reference = image if reference is None else reference
            result["max_pixel_diff"] = int(np.abs(image - reference).max())
            takes_loras = not pipes.fastpath.fuse_qkv and (pipes.lora_slots is not None or not pipes.fastpath.compile)
            if takes_loras:
                with two_cached_loras(pipes) as (adapters, requests, _):
                    switches = timed(lora_switcher(adapters, requests), args.repeats * 4)
                    result["lora_switch_ms"] = 1000 * statistics.median(switches)
                    with adapters.applied(requests[0]):
                        generate(pipes, request)  # warm-up, as for the default timing above
                        with_lora = timed(lambda p=pipes: generate(p, request), args.repeats)
                    result["s_per_image_with_lora"] = statistics.median(with_lora)
            results[name] = result
        except Exception as error:  # e.g. xformers not installed: reported, not fatal
            results[name] = {"error": f"{type(error).__name__}: {error}"[:200]}
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
            pipes = None
    return results


# --- output -------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [f"Benchmark ({report['mode']}), {report['machine']}, {report['date']}", ""]
    if report["mode"] == "cpu":
        lines += ["| model | measure | ours | plain diffusers | ratio | target |", "|---|---|---|---|---|---|"]
        for name, r in report["architectures"].items():
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
    else:
        lines.append(f"device: {report['device']}")
        if "cold_start_s" in report:
            lines += [
                f"cold start from page cache {report['cold_start_s']:.2f} s; one base UNet call (CFG)"
                f" {report['unet_tflop_per_call']:.2f} TFLOP; weights loaded {report['loaded_gib']:.2f} GiB;"
                f" fast path: {report['fastpath']}",
                "",
                "| steps | outputs | refine | s/image | steps/s | base UNet TFLOP/s | peak GiB |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in report["runs"]:
                lines.append(
                    f"| {r['steps']} | {r['outputs']} | {r['refine']} | {r['s_per_image']:.3f}"
                    f" | {r['steps_per_s']:.2f} | {r['base_unet_tflops']:.0f} | {r['peak_gib']:.2f} |"
                )
            lo = report["lora_switch"]
            lines += [
                "",
                f"LoRA switch between two cached rank-16 LoRAs: {lo['ours_s'] * 1000:.1f} ms"
                f" (plain load_lora_weights + delete: {lo['baseline_s'] * 1000:.1f} ms)",
            ]
        if report.get("fastpath_variants"):
            lines += [
                "",
                "| fast-path setting | load s | s/image | max pixel diff vs default | LoRA switch ms | s/image, LoRA on |",
                "|---|---|---|---|---|---|",
            ]
            for name, v in report["fastpath_variants"].items():
                if "error" in v:
                    lines.append(f"| {name} | {v['error']} | | | | |")
                    continue
                switch = f"{v['lora_switch_ms']:.1f}" if "lora_switch_ms" in v else "no LoRAs"
                with_lora = f"{v['s_per_image_with_lora']:.3f}" if "s_per_image_with_lora" in v else ""
                lines.append(
                    f"| {name} | {v['load_s']:.2f} | {v['s_per_image']:.3f} | {v['max_pixel_diff']} | {switch}"
                    f" | {with_lora} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--architectures", nargs="+", default=["tiny", "mid"], choices=("tiny", "mid"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scratch", default=None, help="folder for the full-size weights (gpu mode; ~14 GB)")
    parser.add_argument("--weights-dir", default=None, help="gpu mode: write the weights here once and reuse them")
    parser.add_argument("--parts", nargs="+", default=["runs", "variants"], choices=("runs", "variants"))
    parser.add_argument("--variants", nargs="+", default=None, choices=tuple(FASTPATH_VARIANTS), help="a subset")
    parser.add_argument("--steps", nargs="+", type=int, default=[30, 50], help="gpu mode")
    parser.add_argument("--outputs", nargs="+", type=int, default=[1, 4], help="gpu mode")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="gpu mode's code path on tiny shapes on CPU (a test)")
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), default=None, help="gpu mode: another shape set")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sdxl").setLevel(logging.WARNING)

    report = cpu_mode(args) if args.mode == "cpu" else full_size_mode(args)
    report["date"] = date.today().isoformat()
    report["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    report["torch"] = torch.__version__
    (args.json or Path(f"benchmark-{args.mode}.json")).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
