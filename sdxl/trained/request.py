"""What a request can bring in trained weights (AdapterRequest), checked before anything is fetched:

- `replicate_weights`: a trained_model.tar from our trainer (or the hosted one): a UNet LoRA (`lora.safetensors`) or a
  full fine-tune (`unet.safetensors`), new token rows for both text encoders (`embeddings.pti`) and the word they
  stand for (`special_params.json`, e.g. {"TOK": "<s0><s1>"}: row i of each embedding table is token <s{i}>);
- `lora_scale`: the strength of that LoRA (0 = the base model's image, bit for bit);
- `loras`: more LoRA files (diffusers/peft or kohya/A1111/ComfyUI format, safetensors only), each with a scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sdxl.errors import InputError
from sdxl.guard.url_policy import redact
from sdxl.inputs.request import EXTRA_SCALE_RANGE, LORA_SCALE, MAX_LORAS
from sdxl.validation import check_number

TRAINED_FIELD = "replicate_weights"
LORAS_FIELD = "loras"
OWN_FIELD = "weights"  # the model's own weights (Cog's COG_WEIGHTS / setup(weights))
MAX_LORAS_CHARS = 16 << 10  # four entries with long presigned URLs fit; checked before the JSON is parsed
MAX_URL_CHARS = 8 << 10  # replicate_weights: a long presigned URL fits


@dataclass(frozen=True)
class LoraInput:
    url: str
    scale: float = 1.0


def _redacted(item: object) -> object:
    """A `loras` item fit for an error message: no URL query in it (presigned URLs carry credentials there)."""
    if isinstance(item, dict):
        return {key: _redacted(value) for key, value in item.items()}
    if isinstance(item, list):
        return [_redacted(value) for value in item]
    return redact(item) if isinstance(item, str) else item


def parse_loras(text: str | None, field: str = LORAS_FIELD) -> tuple[LoraInput, ...]:
    """The `loras` input: a JSON list of {"url": "https://...", "scale": 0.8} (scale defaults to 1)."""
    if text is None or not str(text).strip():
        return ()
    if len(text) > MAX_LORAS_CHARS:
        raise InputError(field, f"is {len(text):,} characters long; at most {MAX_LORAS_CHARS:,} are accepted")
    try:
        items = json.loads(text)
    except RecursionError:
        raise InputError(field, "is nested too deeply; give a flat list of objects") from None
    except ValueError as error:
        raise InputError(
            field, f'is not valid JSON ({error}); give a list like [{{"url": "https://...", "scale": 0.8}}]'
        ) from None
    if not isinstance(items, list):
        raise InputError(field, 'must be a JSON list like [{"url": "https://...", "scale": 0.8}]')
    if len(items) > MAX_LORAS:
        raise InputError(field, f"{len(items)} LoRAs given; at most {MAX_LORAS} are allowed")
    loras = tuple(_lora_input(f"{field}[{i}]", item) for i, item in enumerate(items))
    urls = [lora.url for lora in loras]
    if len(set(urls)) != len(urls):
        raise InputError(field, "the same URL is given twice; give it once with the scale you want")
    return loras


def _lora_input(name: str, item: object) -> LoraInput:
    if not isinstance(item, dict) or not isinstance(item.get("url"), str) or set(item) - {"url", "scale"}:
        raise InputError(name, f'{_redacted(item)!r} must be an object {{"url": "https://...", "scale": 0.8}}')
    return LoraInput(item["url"].strip(), check_number(f"{name}.scale", item.get("scale", 1.0), *EXTRA_SCALE_RANGE))


@dataclass(frozen=True)
class AdapterRequest:
    replicate_weights: str | None = None
    lora_scale: float = LORA_SCALE.default
    loras: tuple[LoraInput, ...] = ()

    def __post_init__(self):
        if self.replicate_weights is not None and not isinstance(self.replicate_weights, str):
            raise InputError(TRAINED_FIELD, f"{self.replicate_weights!r} is not a URL")
        if isinstance(self.replicate_weights, str) and len(self.replicate_weights) > MAX_URL_CHARS:
            raise InputError(
                TRAINED_FIELD,
                f"is {len(self.replicate_weights):,} characters long; at most {MAX_URL_CHARS:,} are accepted",
            )
        if isinstance(self.replicate_weights, str) and not self.replicate_weights.strip():
            object.__setattr__(self, "replicate_weights", None)  # an empty string from a form means "none"
        LORA_SCALE.check("lora_scale", self.lora_scale)
