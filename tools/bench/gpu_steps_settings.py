"""The GPU benchmark's steps after the defaults: torch.compile, LoRAs, each fast-path setting alone, refine modes."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from functools import partial

import torch
from PIL import Image

from sdxl.model.fastpath import FastPath, apply_fastpath, warm_up
from sdxl.model.loading import control_views, load_pipelines
from sdxl.model.random_weights.control import random_controlnet
from tools.bench.gpu_plan import REFINE_MODES, VARIANTS, unet_calls
from tools.bench.gpu_steps import (
    Context,
    cuda_peak_gib,
    cuda_peak_reset,
    fastpath_env,
    fmt,
    free_memory,
    image_array,
    pixel_diff,
    time_images,
)
from tools.bench.measure import lora_switcher, sync, timed, two_cached_loras, unet_counter


def _vs_defaults(ctx: Context, seconds: float) -> float | None:
    measured = ctx.facts.get("image_s_measured")
    return seconds / measured if measured else None


def _lora_part(ctx: Context, pipes, m: dict, until: float) -> None:
    """The switch between two cached LoRAs, and seconds per image with one of them active."""
    with two_cached_loras(pipes, ctx.loras()) as (adapters, requests, _):
        switches = timed(lora_switcher(adapters, requests), 4 * ctx.config.repeats, until)
        m["lora_switch_ms"] = 1000 * statistics.median(switches)
        with adapters.applied(requests[0]):
            m["s_per_image_lora"], _ = time_images(pipes, ctx.request(), ctx.config.repeats, until)
    m["lora_vs_defaults"] = _vs_defaults(ctx, m["s_per_image_lora"])


def step_compile(ctx: Context, m: dict, until: float) -> str:
    """Row 3: regional torch.compile with LoRA slots: its warm-up (timed apart from the load), seconds per image,
    and the LoRA switch, counting the graphs dynamo builds meanwhile (0: no recompile)."""
    from torch._dynamo.utils import counters

    free_memory()
    started = time.perf_counter()
    pipes = load_pipelines(ctx.root, fastpath=FastPath())
    m["load_s"] = time.perf_counter() - started
    ctx.loras(pipes.text2img.unet)  # written from the plain UNet, before the slots replace its layers
    compiled = replace(FastPath.from_env(), compile=True)
    started = time.perf_counter()
    pipes = apply_fastpath(pipes, compiled)  # the slots (if its LoRA backend takes them) and compile, then
    warm_up(pipes)  # the warm-up setup runs after loading
    sync()
    m["compile_warmup_s"] = ctx.facts["compile_s"] = time.perf_counter() - started
    try:
        m["s_per_image"], first = time_images(pipes, ctx.request(), ctx.config.repeats, until)
        m["vs_defaults"], m["max_pixel_diff"] = _vs_defaults(ctx, m["s_per_image"]), pixel_diff(ctx, image_array(first))
        graphs = counters["stats"]["unique_graphs"]
        _lora_part(ctx, pipes, m, until)
        m["graphs_built_by_lora_switches"] = counters["stats"]["unique_graphs"] - graphs
    finally:
        del pipes
        free_memory()
    return (
        f"warm-up {m['compile_warmup_s']:.1f} s; {m['s_per_image']:.3f} s/image (x{fmt(m['vs_defaults'], '.3f')});"
        f" LoRA switch {m['lora_switch_ms']:.1f} ms, {m['graphs_built_by_lora_switches']} new graphs;"
        f" LoRA on {m['s_per_image_lora']:.3f} s/image; max pixel diff {m['max_pixel_diff']}"
    )


def step_lora(ctx: Context, m: dict, until: float) -> str:
    """Row 4: peft adapters on the default pipelines; unloaded again after, so the rows after it run without."""
    pipes = ctx.default_pipes()
    try:
        _lora_part(ctx, pipes, m, until)
    finally:
        pipes.text2img.unload_lora_weights()
    return (
        f"switch {m['lora_switch_ms']:.1f} ms; one LoRA on: {m['s_per_image_lora']:.3f} s/image"
        f" (x{fmt(m['lora_vs_defaults'], '.3f')} the defaults)"
    )


def step_variant(ctx: Context, m: dict, until: float, name: str) -> str:
    """Row 5: one fast-path setting alone, in a fresh load beside the default pipelines."""
    free_memory()
    started = time.perf_counter()
    with fastpath_env(VARIANTS[name]):
        pipes = load_pipelines(ctx.root)
    sync()
    m["load_s"] = time.perf_counter() - started
    try:
        m["s_per_image"], first = time_images(pipes, ctx.request(), ctx.config.repeats, until)
        m["vs_defaults"], m["max_pixel_diff"] = _vs_defaults(ctx, m["s_per_image"]), pixel_diff(ctx, image_array(first))
    finally:
        del pipes
        free_memory()
    return (
        f"{m['s_per_image']:.3f} s/image (x{fmt(m['vs_defaults'], '.3f')} the defaults); load {m['load_s']:.1f} s;"
        f" max pixel diff {m['max_pixel_diff']}"
    )


def step_refine(ctx: Context, m: dict, until: float, mode: str) -> str:
    """Row 6: a refine mode at several outputs; UNet calls counted against the expected split."""
    pipes, config = ctx.default_pipes(), ctx.config
    request = ctx.request(refine=mode, num_inference_steps=config.refine_steps, num_outputs=config.refine_outputs)
    warm_up = replace(request, num_inference_steps=4)  # same shapes, few steps (4: base_image_refiner runs >= 1)
    cuda_peak_reset()
    with unet_counter(pipes) as counts:
        seconds, _ = time_images(pipes, request, 1, until, warm_up=warm_up)
    m["s_per_image"] = seconds / config.refine_outputs
    m["peak_gib"] = cuda_peak_gib()
    warm_calls = unet_calls(mode, 4)
    m["unet_calls"] = {key: counts[key] - warm_calls[key] for key in counts}
    m["expected"] = unet_calls(mode, config.refine_steps)
    check = "as expected" if m["unet_calls"] == m["expected"] else f"EXPECTED {m['expected']}"
    return f"{m['s_per_image']:.3f} s/image; peak {fmt(m['peak_gib'], '.2f', ' GiB')}; UNet calls {m['unet_calls']} {check}"


def step_controlnet(ctx: Context, m: dict, until: float) -> str:
    """Row 7: a canny ControlNet request (its edge map computed from a photo-like image) against the same plain
    request, both timed here. The ControlNet is random, built from the loaded base UNet on the device."""
    pipes = ctx.default_pipes()
    started = time.perf_counter()
    if ("canny", "text2img") not in pipes.control_views:
        with torch.device(pipes.placement.device):
            controlnet = random_controlnet(pipes.text2img.unet, seed=0).eval().requires_grad_(False)
        pipes.control_views.update(control_views(pipes.text2img, {"canny": controlnet}))
    sync()
    m["controlnet_setup_s"] = time.perf_counter() - started
    size = ctx.config.size
    control_image = Image.radial_gradient("L").resize((size, size)).convert("RGB")
    plain = ctx.request()
    controlled = replace(plain, controlnet="canny", control_image=control_image)
    m["plain_s_per_image"], _ = time_images(pipes, plain, ctx.config.repeats, until)
    cuda_peak_reset()
    m["s_per_image"], _ = time_images(pipes, controlled, ctx.config.repeats, until)
    m["peak_gib"] = cuda_peak_gib()
    m["vs_plain"] = m["s_per_image"] / m["plain_s_per_image"]
    return (
        f"{m['s_per_image']:.3f} s/image vs {m['plain_s_per_image']:.3f} plain (x{m['vs_plain']:.2f});"
        f" peak {fmt(m['peak_gib'], '.2f', ' GiB')}; ControlNet built in {m['controlnet_setup_s']:.1f} s"
    )


BODIES = {
    "compile": step_compile,
    "lora": step_lora,
    **{f"variant_{name}": partial(step_variant, name=name) for name in VARIANTS},
    **{f"refine_{mode}": partial(step_refine, mode=mode) for mode in REFINE_MODES},
    "controlnet": step_controlnet,
}
