"""The GPU benchmark's steps. Each fills `m` (its row's numbers) as it goes, so a step stopped at its deadline
(OverBudget) still reports what it measured, and returns the row's one-line summary."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sdxl.inference.generation import generate
from sdxl.inputs.request import GenerationRequest
from sdxl.model.loading import load_pipelines
from tools.bench.gpu_plan import Config
from tools.bench.measure import OverBudget, sync, timed, write_two_loras

FASTPATH_ENV = ("SDXL_DTYPE", "SDXL_ATTENTION", "SDXL_CHANNELS_LAST", "SDXL_FUSE_QKV", "SDXL_COMPILE")
FASTPATH_ENV += ("SDXL_DIRECT_LOAD", "SDXL_VAE_UPCAST", "SDXL_LORA_SLOT_RANK")
ROOT = Path(__file__).resolve().parents[2]  # the cold start runs there as `python -m tools.bench.gpu_coldstart`


@dataclass
class Context:
    """What the steps share inside one worker process."""

    config: Config
    root: Path
    work: Path  # scratch folder (LoRA files)
    facts: dict
    pipes: object = None  # the default pipelines, loaded by the first step that needs them
    reference: np.ndarray | None = None  # the default image, for the variants' pixel difference
    lora_files: list = field(default_factory=list)

    def request(self, **changes) -> GenerationRequest:
        base = GenerationRequest(width=self.config.size, height=self.config.size, seed=0, refine="no_refiner")
        return replace(base, **{"num_inference_steps": self.config.steps, **changes})

    def default_pipes(self):
        if self.pipes is None:
            started = time.perf_counter()
            self.pipes = load_pipelines(self.root)
            sync()
            self.facts.setdefault("load_s", time.perf_counter() - started)
        return self.pipes

    def loras(self, unet=None) -> list[Path]:
        """Two rank-16 LoRA files shaped for this UNet, written once per run (shared by rows 3 and 4)."""
        folder = self.work / "loras"
        if not self.lora_files:
            self.lora_files = sorted(folder.glob("*/lora.safetensors"))
        if not self.lora_files:
            self.lora_files = write_two_loras(folder, unet or self.default_pipes().text2img.unet)
        return self.lora_files

    def keep_reference(self, image: np.ndarray) -> None:
        self.reference = image
        np.save(self.work / "reference.npy", image)  # for a worker started after this one was stopped

    def load_reference(self) -> None:
        path = self.work / "reference.npy"
        self.reference = np.load(path) if path.is_file() else None


def gib(value: float) -> float:
    return value / 2**30


def cuda_peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_gib() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def free_memory() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def fastpath_env(env: dict):
    """The library reads its fast-path settings from the environment at load: set them for one load only."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def image_array(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(int)


def pixel_diff(ctx: Context, image: np.ndarray) -> int | None:
    return None if ctx.reference is None else int(np.abs(image - ctx.reference).max())


def time_images(pipes, request: GenerationRequest, repeats: int, until: float, warm_up: GenerationRequest = None):
    """One warm-up run (`warm_up`, else the request itself), then the median seconds of `repeats` runs; returns
    (seconds, the warm-up's result)."""
    if time.monotonic() >= until:
        raise OverBudget("deadline reached before the warm-up")
    first = generate(pipes, warm_up or request)
    seconds = timed(lambda: generate(pipes, request), repeats, until)
    return statistics.median(seconds), first


def fmt(value, spec: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{spec}}{unit}"


# --- row 1 --------------------------------------------------------------------------------------------------------


def matmul_tflops(ctx: Context) -> float:
    """The device's own fp16 matrix rate (8192^3 products on CUDA; a small fp32 one on CPU), the yardstick for the
    UNet's achieved rate."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.float16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype)
    for _ in range(3):
        a @ a
    seconds = timed(lambda: a @ a, 10)
    ctx.facts["matmul_what"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')} matmul, median of 10"
    return 2 * n**3 / statistics.median(seconds) / 1e12


def unet_tflop_per_call(pipes, size: int) -> float:
    """TFLOPs of one base UNet call with CFG (batch 2) at `size`, by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, placement = pipes.text2img.unet, pipes.placement
    side, pooled = size // pipes.text2img.vae_scale_factor, pipes.text2img.text_encoder_2.config.projection_dim

    def zeros(*shape):
        return torch.zeros(*shape, device=placement.device, dtype=placement.dtype)

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:  # both are per thread: the call runs on this one
        unet(
            zeros(2, unet.config.in_channels, side, side),
            torch.tensor(500, device=placement.device),
            encoder_hidden_states=zeros(2, 77, unet.config.cross_attention_dim),
            added_cond_kwargs={"text_embeds": zeros(2, pooled), "time_ids": zeros(2, 6)},
        )
    return counter.get_total_flops() / 1e12


def unet_steps_per_s(pipes, request: GenerationRequest, until: float) -> float:
    """Base UNet steps per second inside one generation, from the step-end timestamps (first to last)."""
    stamps = []

    def on_step(stage, step, total):
        sync()
        stamps.append(time.perf_counter())
        if time.monotonic() >= until:
            raise OverBudget(f"deadline reached at step {step} of {total}")

    generate(pipes, request, on_step=on_step)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def step_defaults(ctx: Context, m: dict, until: float) -> str:
    """Row 1: the defaults (base only, batch 1) end to end, VAE decode, safety checker and watermark included."""
    started = time.perf_counter()
    pipes = ctx.default_pipes()
    m["load_s"] = time.perf_counter() - started
    m["loaded_gib"] = gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
    m["matmul_tflops"] = ctx.facts["matmul_tflops"] = matmul_tflops(ctx)
    m["unet_tflop_per_call"] = unet_tflop_per_call(pipes, ctx.config.size)
    request = ctx.request()
    cuda_peak_reset()
    m["s_per_image"], first = time_images(pipes, request, ctx.config.repeats, until)
    ctx.keep_reference(image_array(first))
    m["peak_gib"] = cuda_peak_gib()
    m["unet_steps_per_s"] = unet_steps_per_s(pipes, request, until)
    m["unet_tflops"] = m["unet_tflop_per_call"] * m["unet_steps_per_s"]
    m["of_matmul_rate"] = m["unet_tflops"] / m["matmul_tflops"]
    m["decode_and_rest_s"] = max(m["s_per_image"] - ctx.config.steps / m["unet_steps_per_s"], 0.0)
    ctx.facts.update(
        image_s=m["s_per_image"],
        image_s_measured=m["s_per_image"],
        unet_step_s=1 / m["unet_steps_per_s"],
        decode_s=m["decode_and_rest_s"],
    )
    return (
        f"{m['s_per_image']:.3f} s/image; {m['unet_steps_per_s']:.2f} UNet steps/s; {m['unet_tflops']:.3g} TFLOP/s"
        f" = {100 * m['of_matmul_rate']:.0f} % of the matmul rate; peak {fmt(m['peak_gib'], '.2f', ' GiB')};"
        f" weights {fmt(m['loaded_gib'], '.2f', ' GiB')}; VAE + checker + rest {m['decode_and_rest_s']:.3f} s"
    )


# --- row 2 --------------------------------------------------------------------------------------------------------


def cold_start(ctx: Context, m: dict, until: float, direct: bool) -> str:
    """A fresh process loading base + refiner + checker as setup does (the files are in the page cache)."""
    env = {**os.environ, "SDXL_DIRECT_LOAD": "1" if direct else "0"}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tools.bench.gpu_coldstart", str(ctx.root)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(until - time.monotonic(), 1),
        )
    except subprocess.TimeoutExpired:
        raise OverBudget("the cold-start process ran into the deadline and was stopped") from None
    if done.returncode:
        raise RuntimeError(f"cold-start process failed: {done.stderr.strip().splitlines()[-1:]}")
    m["process_s"] = time.perf_counter() - started
    m.update(json.loads(done.stdout.strip().splitlines()[-1]))
    ctx.facts.setdefault("process_start_s", m["imports_s"])
    return f"load {m['load_s']:.2f} s (process {m['process_s']:.2f} s, of it imports {m['imports_s']:.2f} s)"


def step_cold_start(ctx: Context, m: dict, until: float) -> str:
    return cold_start(ctx, m, until, direct=False)


def step_cold_start_direct(ctx: Context, m: dict, until: float) -> str:
    return cold_start(ctx, m, until, direct=True)
