"""The registry of the seven samplers clients can name, and a fresh scheduler per request."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

# name -> (class, config overrides). KarrasDPM is DPM++ 2M with Karras sigmas.
SCHEDULERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}
DEFAULT_SCHEDULER = "K_EULER"


def make_scheduler(name: str, base_config):
    """A new scheduler instance, so no sampler state (multistep history, Heun's half steps) outlives a request."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)
