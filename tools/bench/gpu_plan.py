"""What the GPU benchmark measures, in order of importance, and what each step is expected to cost.

Each estimate is built from what the run measured before it (facts: the load time, the seconds per UNet step and per
image at the defaults, the process start), falling back to a prior per shape set until then. A step whose estimate
exceeds the time left is skipped; one that starts is given until min(deadline, start + max(2 x estimate,
estimate + 30 s)) and is stopped there. No torch here: the parent process plans and watches without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VARIANTS = {  # row 5: each setting alone against the defaults, in a fresh load
    "bf16": {"SDXL_DTYPE": "bf16"},
    "channels_last": {"SDXL_CHANNELS_LAST": "1"},
    "fused_qkv": {"SDXL_FUSE_QKV": "1"},
    "vae_upcast": {"SDXL_VAE_UPCAST": "1"},
}
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")

# Before anything is measured. Full-size numbers are guesses from published H100 figures (~2.5 s per 30-step
# image eager, 10-20 s to load 12 GB); tiny and mid are what this repository's 2-core CPU machine measured.
PRIORS = {
    "full": dict(load_s=25.0, image_s=3.0, unet_step_s=0.09, decode_s=0.5, process_start_s=15.0, compile_s=120.0),
    "mid": dict(load_s=3.0, image_s=2.0, unet_step_s=0.3, decode_s=0.5, process_start_s=8.0, compile_s=40.0),
    "tiny": dict(load_s=1.0, image_s=0.2, unet_step_s=0.02, decode_s=0.05, process_start_s=8.0, compile_s=15.0),
}
LORA_SETUP_S = {"full": 10.0, "mid": 3.0, "tiny": 1.0}  # write two rank-16 LoRAs and load each once
# A ControlNet copies the base UNet's encoder half (1.25 B of 2.57 B params at full size): a guess of its share of a
# UNet step, and the seconds to build a random one from the loaded UNet on the device.
CONTROLNET_STEP_SHARE = 0.5
CONTROLNET_SETUP_S = {"full": 15.0, "mid": 2.0, "tiny": 1.0}


@dataclass(frozen=True)
class Config:
    shapes: str  # "full" on the GPU; "tiny"/"mid" for --smoke on CPU
    size: int
    steps: int  # row 1's steps
    refine_steps: int  # row 6
    refine_outputs: int
    repeats: int
    smoke: bool
    estimate_scale: float = 1.0  # tests: 0 starts every step, so the deadline has to stop them
    min_allowance_s: float = 30.0  # a started step may run at least this long (within the deadline)
    stall: str | None = None  # tests: this step hangs where nothing can interrupt it, as a compile could

    @classmethod
    def for_run(cls, shapes: str, smoke: bool, repeats: int, **tuning) -> Config:
        size = {"tiny": 128, "mid": 256, "full": 1024}[shapes]
        if smoke:
            return cls(shapes, size, 4, 6, 2, repeats, True, **tuning)
        return cls(shapes, size, 30, 50, 4, repeats, False, **tuning)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Step:
    name: str
    id: str
    title: str


def steps_for(config: Config) -> list[Step]:
    size = f"{config.size}x{config.size}"
    steps = [
        Step("defaults", "1", f"defaults, base only, {size}, {config.steps} steps, 1 image, end to end"),
        Step("cold_start", "2a", "cold start, base + refiner + checker, from page cache, fresh process"),
        Step("cold_start_direct", "2b", "cold start as 2a with SDXL_DIRECT_LOAD=1"),
        Step("compile", "3", "SDXL_COMPILE=1 (regional, rank-64 LoRA slots)"),
        Step("lora", "4", "LoRA at the defaults (two cached rank-16 LoRAs)"),
    ]
    steps += [Step(f"variant_{name}", f"5{'abcd'[i]}", f"{name} alone vs defaults") for i, name in enumerate(VARIANTS)]
    outputs, refine_steps = config.refine_outputs, config.refine_steps
    steps += [
        Step(f"refine_{mode}", f"6{'abc'[i]}", f"{mode}, {outputs} outputs, {refine_steps} steps, {size}")
        for i, mode in enumerate(REFINE_MODES)
    ]
    steps.append(Step("controlnet", "7", f"ControlNet (canny) request vs plain, {size}, {config.steps} steps"))
    return steps


def _known(facts: dict, config: Config) -> dict:
    return {**PRIORS[config.shapes], **{k: v for k, v in facts.items() if k in PRIORS["full"] and v is not None}}


def _image_runs(config: Config) -> int:
    return 1 + config.repeats  # a warm-up, then the timed repeats


def unet_calls(refine: str, steps: int, refiner_steps: int | None = None, high_noise_frac: float = 0.8) -> dict:
    """UNet evaluations of one request: SDXL's "leading" timesteps (steps_offset 1) decide the expert split."""
    if refine == "no_refiner":
        return {"base": steps, "refiner": 0}
    if refine == "base_image_refiner":
        return {"base": steps, "refiner": int((refiner_steps or steps) * 0.3)}
    ratio = 1000 // steps
    base = sum(1 for i in range(steps) if i * ratio + 1 >= (1 - high_noise_frac) * 1000)
    return {"base": base, "refiner": steps - base}


def _refine_estimate(mode: str, config: Config, f: dict) -> float:
    calls = unet_calls(mode, config.refine_steps)
    per_image = (calls["base"] + calls["refiner"]) * f["unet_step_s"] + f["decode_s"]
    warm_up = 2 * f["unet_step_s"] + f["decode_s"]  # a 2-step run of the same shape
    return config.refine_outputs * (warm_up + per_image)


def estimate(step: str, facts: dict, config: Config) -> float:
    """Seconds `step` is expected to take, from what has been measured so far."""
    f = _known(facts, config)
    images = _image_runs(config) * f["image_s"]
    lora = LORA_SETUP_S[config.shapes] + _image_runs(config) * f["image_s"] * 1.15
    if step == "defaults":
        seconds = f["load_s"] + images + 2 * f["image_s"] + 2  # + FLOP count and the matrix rate
    elif step.startswith("cold_start"):
        seconds = f["process_start_s"] + 1.3 * f["load_s"]
    elif step == "compile":
        seconds = f["load_s"] + f["compile_s"] + images + lora
    elif step == "lora":
        seconds = lora
    elif step.startswith("variant_"):
        upcast = _image_runs(config) * f["decode_s"] if step == "variant_vae_upcast" else 0.0
        seconds = f["load_s"] + images + upcast
    elif step.startswith("refine_"):
        seconds = _refine_estimate(step.removeprefix("refine_"), config, f)
    elif step == "controlnet":
        controlled = _image_runs(config) * (f["image_s"] + config.steps * f["unet_step_s"] * CONTROLNET_STEP_SHARE)
        seconds = CONTROLNET_SETUP_S[config.shapes] + images + controlled
    else:
        raise ValueError(f"unknown step {step!r}")
    return seconds * config.estimate_scale


def allowed_until(now: float, estimate_s: float, deadline: float, min_allowance_s: float = 30.0) -> float:
    """When a step that starts at `now` is stopped: at the deadline, or earlier when it runs far past its estimate
    (so one bad estimate cannot eat the time of every step after it)."""
    return min(deadline, now + max(2 * estimate_s, estimate_s + min_allowance_s))
