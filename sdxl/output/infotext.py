"""Generation parameters as AUTOMATIC1111's `parameters` text, which A1111, ComfyUI readers and Civitai parse.

The layout A1111 writes and reads back (modules/infotext_utils.py):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>            (left out when empty)
    Steps: 50, Sampler: Euler, CFG scale: 7.5, Seed: 123, Size: 1024x1024, Model: ..., ...

The last line is `key: value` pairs; a value holding ',', ':' or a newline is JSON-quoted. Keys A1111 knows are used
where one fits (Steps, Sampler, CFG scale, Seed, Size, Model, Denoising strength, Refiner, Refiner switch at,
Batch size, Batch pos); the others name this model's own inputs.

Reproducing an image: every output of a request comes from one seed. The pipeline draws all num_outputs starting
latents from one generator seeded with it, so output i is reproduced by the same inputs with the same seed and
num_outputs, taking output i: "Batch size" and "Batch pos" say which (as A1111 writes them; they are left out for a
single output). URLs of weights appear only as host and file name: never a query string or credentials.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from sdxl.guard import remote
from sdxl.inputs.request import GenerationRequest
from sdxl.model import weights

# Our scheduler names -> A1111's sampler names (KarrasDPM is DPM++ 2M with Karras sigmas; PNDM is A1111's PLMS).
SAMPLERS = {
    "DDIM": "DDIM",
    "DPMSolverMultistep": "DPM++ 2M",
    "HeunDiscrete": "Heun",
    "KarrasDPM": "DPM++ 2M Karras",
    "K_EULER_ANCESTRAL": "Euler a",
    "K_EULER": "Euler",
    "PNDM": "PLMS",
}
NEGATIVE_PREFIX = "Negative prompt: "
# A1111's pattern for one `key: value` pair of the last line.
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass(frozen=True)
class Weights:
    """The weights a request used, for the record: the base, and URLs the request brought."""

    model: str  # the base model's name
    own_weights: str | None = None  # a trained tar applied at setup (COG_WEIGHTS)
    replicate_weights: str | None = None
    lora_scale: float = 0.6
    loras: tuple[tuple[str, float], ...] = ()  # (url, scale)

    @classmethod
    def of(cls, random_weights: str | None, own_weights: str | None, adapters) -> Weights:
        """From the loaded model and a request's AdapterRequest (replicate_weights, lora_scale, loras)."""
        return cls(
            model=model_name(random_weights),
            own_weights=own_weights,
            replicate_weights=adapters.replicate_weights,
            lora_scale=adapters.lora_scale,
            loras=tuple((lora.url, lora.scale) for lora in adapters.loras),
        )


def model_name(random_weights: str | None) -> str:
    name = weights.BASE.repo_id.rpartition("/")[2]
    return f"{name} (random {random_weights} test weights)" if random_weights else name


def source_name(url: str) -> str:
    """`host/file` of a URL: what identifies the weights without what may authorise fetching them."""
    text = remote.redact(url)
    try:
        parts = urlsplit(text)
        host = parts.hostname or ""
    except ValueError:
        return "(unreadable URL)"
    file = parts.path.rstrip("/").rpartition("/")[2]
    return f"{host}/{file}" if host else file or "(unnamed)"


def quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _number(value: float) -> str:
    return f"{value:g}"


def _pairs(request: GenerationRequest, used: Weights, position: int) -> list[tuple[str, object]]:
    pairs = [
        ("Steps", request.num_inference_steps),
        ("Sampler", SAMPLERS.get(request.scheduler, request.scheduler)),
        ("CFG scale", _number(request.guidance_scale)),
        ("Seed", request.seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", used.model),
    ]
    if request.num_outputs > 1:
        pairs += [("Batch size", request.num_outputs), ("Batch pos", position)]
    if request.mode != "text2img":
        pairs += [("Mode", request.mode), ("Denoising strength", _number(request.prompt_strength))]
    if request.refine != "no_refiner":
        pairs += [("Refiner", weights.REFINER.repo_id.rpartition("/")[2]), ("Refine", request.refine)]
        if request.refine == "expert_ensemble_refiner":
            pairs.append(("Refiner switch at", _number(request.high_noise_frac)))
        else:
            pairs.append(("Refine steps", request.refiner_steps))
    if used.replicate_weights or used.own_weights:
        key, url = (
            ("Replicate weights", used.replicate_weights)
            if used.replicate_weights
            else ("Own weights", used.own_weights)
        )
        pairs += [(key, source_name(url)), ("LoRA scale", _number(used.lora_scale))]
    if used.loras:
        pairs.append(("LoRAs", ", ".join(f"{source_name(url)}: {_number(scale)}" for url, scale in used.loras)))
    if request.prompt_weighting:
        pairs.append(("Prompt weighting", "compel"))
    return pairs


def parameters(request: GenerationRequest, used: Weights, position: int = 0) -> str:
    """The `parameters` text of output `position` (its index among the request's generated images)."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(NEGATIVE_PREFIX + request.negative_prompt)
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in _pairs(request, used, position)))
    return "\n".join(lines)


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from a `parameters` text, read the way A1111 reads it."""
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:  # A1111: a last line with fewer than 3 pairs is part of the prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX) :]
        (negative if in_negative else prompt).append(line)
    pairs = {key: json.loads(value) if value.startswith('"') else value for key, value in PAIR.findall(last)}
    return "\n".join(prompt), "\n".join(negative), pairs


def for_outputs(request: GenerationRequest, used: Weights, nsfw: list[bool]) -> list[str]:
    """One text per output that survived the safety checker, each with its position among all generated images."""
    flags = nsfw or [False] * request.num_outputs
    return [parameters(request, used, position) for position, flagged in enumerate(flags) if not flagged]
