"""Measuring helpers shared by the benchmark's CPU and GPU modes: timing, UNet call counts, and cached LoRAs built
from a UNet's own layer shapes (no download, no HTTP: they are put straight into the weights cache)."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sdxl.inputs.request import GenerationRequest
from sdxl.model.compute import on_compute_thread

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the trainer's and most published SDXL LoRAs' layers


class OverBudget(Exception):
    """A step ran into its deadline: what it measured so far is kept, the rest is not measured."""


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def on_compute(fn):
    """`fn` as a call onto the compute thread (sdxl.model.compute), where the predictor's edge runs all model work, so
    torch's CPU threads are shared alike (a second thread running torch would grow a second OpenMP team and slow
    both down). For library calls and baselines; the predictor's run() goes there by itself."""
    return lambda: on_compute_thread(lambda _cancelled: fn())


def timed(fn, repeats: int, until: float | None = None) -> list[float]:
    """Wall seconds of `repeats` calls; with `until` (time.monotonic()), stops before a call that would start late."""
    seconds = []
    for _ in range(repeats):
        if until is not None and time.monotonic() >= until:
            raise OverBudget(f"deadline reached after {len(seconds)} of {repeats} timed runs")
        sync()
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds


def side_by_side(ours, theirs, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of two callables, interleaved so drift (thermal, other load) hits both alike. Callers send
    model work to the compute thread (on_compute) unless it goes there by itself."""
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


def expected_unet_calls(request: GenerationRequest) -> dict:
    from tools.bench.gpu_plan import unet_calls

    return unet_calls(request.refine, request.num_inference_steps, request.refiner_steps, request.high_noise_frac)


# --- LoRAs ----------------------------------------------------------------------------------------------------------


def random_lora_state(unet: torch.nn.Module, seed: int, rank: int = 16) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA on every attention projection of `unet`, shaped from its layers (no second UNet is built,
    which at full size would cost seconds and gigabytes), keyed as diffusers' save_lora_weights expects."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(LORA_TARGETS) or not hasattr(module, "in_features"):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.01
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
    return state


def write_lora_file(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    from diffusers import StableDiffusionXLPipeline

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name="lora.safetensors")
    return folder / "lora.safetensors"


def write_two_loras(folder: Path, unet: torch.nn.Module, rank: int = 16) -> list[Path]:
    return [write_lora_file(folder / f"lora{seed}", random_lora_state(unet, seed, rank)) for seed in (1, 2)]


@contextlib.contextmanager
def two_cached_loras(pipes, files: list[Path] | None = None, rank: int = 16):
    """Two LoRAs held by the predictor's TrainedWeights, each loaded once, so what follows are switches between cached
    LoRAs: yields (adapters, [request for A, request for B], [file A, file B]). The files are put into a weights
    cache under made-up URLs, as a finished download leaves them; nothing is fetched."""
    from sdxl.trained.request import AdapterRequest, LoraInput
    from sdxl.trained.trained_weights import TrainedWeights
    from sdxl.trained.weights_cache import LORA_FILE, WeightsCache

    with tempfile.TemporaryDirectory() as tmp:
        files = files or write_two_loras(Path(tmp) / "made", pipes.text2img.unet, rank)
        cache = WeightsCache(Path(tmp) / "cache", resolver=_no_lookups)
        urls = [f"https://loras.invalid/{i}.safetensors" for i in range(len(files))]
        for url, path in zip(urls, files):
            cache.put("lora", url, {LORA_FILE: path.read_bytes()})
        adapters = TrainedWeights(pipes, cache)
        requests = [AdapterRequest(loras=(LoraInput(url, 1.0),)) for url in urls]
        for request in requests:
            with adapters.applied(request):
                pass
        yield adapters, requests, files


def _no_lookups(host: str, port: int) -> list[str]:
    raise OSError(f"the benchmark's LoRAs are cached; {host} is never looked up")


def lora_switcher(adapters, requests):
    turn = iter(range(10**9))

    def switch():
        with adapters.applied(requests[next(turn) % 2]):
            pass

    return switch
