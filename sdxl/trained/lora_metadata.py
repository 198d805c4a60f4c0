"""The LoraConfig a LoRA file's header may set: only the keys that describe the LoRA's own matrices.

diffusers builds a peft LoraConfig from a file's `lora_adapter_metadata` header as it stands (LoraConfig(**metadata)).
A client's file could so ask peft for `modules_to_save` (deep copies of whole modules, which stay in the model when
the load is then refused), `trainable_token_indices` or `target_parameters` (other wrappers), `init_lora_weights`
such as "pissa" (which rewrites the base weights), or a regex `target_modules` that backtracks for minutes. We keep
the keys diffusers itself infers from the tensors when there is no metadata (rank, alpha, their per-layer patterns,
target modules, DoRA, LoRA bias) plus rsLoRA's scaling switch, check their types and sizes, and drop the rest.
"""

from __future__ import annotations

import logging
import math
import re

from sdxl.errors import InputError

log = logging.getLogger(__name__)

PREFIXES = ("unet", "text_encoder", "text_encoder_2")
ALLOWED_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora")
ALLOWED_KEYS += ("lora_bias",)
MAX_RANK = 1024
MAX_PATTERNS = 512  # rank_pattern / alpha_pattern entries: each is a regex peft matches against every target layer
MAX_TARGETS = 1024  # target_modules entries
MODULE_NAME = re.compile(r"\^?[A-Za-z0-9_.]{1,256}")  # module names and the patterns diffusers writes: no regex syntax


def _number(value, low: float, high: float, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (not integer or isinstance(value, int)) and low <= value <= high


def _names(value, limit: int) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= limit
        and all(isinstance(name, str) and MODULE_NAME.fullmatch(name) for name in value)
    )


def _valid(key: str, value) -> bool:
    if key == "r":
        return _number(value, 1, MAX_RANK, integer=True)
    if key == "lora_alpha":
        return _number(value, -1e6, 1e6, integer=False)
    if key in ("use_rslora", "use_dora", "lora_bias"):
        return isinstance(value, bool)
    if key == "target_modules":  # a plain string would be a regex matched against every module name
        return _names(value, MAX_TARGETS)
    integer = key == "rank_pattern"
    return (
        isinstance(value, dict)
        and len(value) <= MAX_PATTERNS
        and (not value or _names(list(value), MAX_PATTERNS))
        and all(_number(v, 1 if integer else -1e6, MAX_RANK if integer else 1e6, integer) for v in value.values())
    )


def allowed_metadata(metadata: dict | None, field: str) -> dict | None:
    """The file's LoRA metadata (keys `unet.r`, `text_encoder.lora_alpha`, ...) with only ALLOWED_KEYS, each checked."""
    if not metadata:
        return None
    if not isinstance(metadata, dict):
        raise InputError(field, "the LoRA file's adapter metadata is not a JSON object")
    kept, dropped = {}, []
    for full_key, value in metadata.items():
        prefix, _, key = str(full_key).rpartition(".")
        if prefix not in PREFIXES or key not in ALLOWED_KEYS:
            dropped.append(str(full_key)[:80])
            continue
        if not _valid(key, value):
            raise InputError(
                field,
                f"the LoRA file's adapter metadata sets {full_key} to {str(value)[:80]!r}; allowed: r an integer "
                f"1..{MAX_RANK}, lora_alpha a number, target_modules and pattern keys lists of at most {MAX_TARGETS} "
                f"module names (letters, digits, '_' and '.'), at most {MAX_PATTERNS} pattern entries",
            )
        kept[full_key] = value
    if dropped:
        log.warning("%s: ignoring LoRA metadata keys that are not the LoRA's own shape: %s", field, dropped[:10])
    return kept or None
