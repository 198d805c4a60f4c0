"""The validated, frozen trainer inputs: every check a client can fail lives here, before any model is loaded.

Field names, types and defaults are the hosted `stability-ai/sdxl` trainer's (see the API contract). Errors name the
field, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

from sdxl.errors import InputError
from sdxl.formats import new_token
from sdxl.request import SEED_RANGE, random_seed

LR_SCHEDULERS = ("constant", "linear")
FILETYPES = ("infer", "zip", "tar")
RESOLUTION_RANGE = (64, 2048)
RESOLUTION_MULTIPLE = 8  # the VAE's spatial factor: latents are resolution / 8
STEPS_RANGE = (1, 1_000_000)
BATCH_RANGE = (1, 64)
RANK_RANGE = (1, 512)
CLIPSEG_TEMPERATURE_RANGE = (0.0, 10.0)  # exclusive low end: a zero temperature would divide by zero
TOKEN_STRING_PATTERN = re.compile(r"^[^\s<>]{1,64}$")  # one word; angle brackets are for the new tokens <s0>, <s1>
NEW_TOKENS_PER_STRING = 2  # <s0><s1> for one token_string, as the hosted trainer does

# Inputs that only tune logging and checkpoint cadence: a run may resume from a checkpoint made with other values.
RESUME_INDEPENDENT = ("verbose", "checkpointing_steps")


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(name, f"{value!r} is not an integer")
    if not low <= value <= high:
        raise InputError(name, f"{value} is out of range; allowed: {low} to {high}")


def _check_float(name: str, value, low: float, high: float, *, low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(name, f"{value!r} is not a finite number")
    if value > high or value < low or (value == low and not low_inclusive):
        bound = "from" if low_inclusive else "above"
        raise InputError(name, f"{value} is out of range; allowed: {bound} {low} up to {high}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(name, f"{value!r} is not one of {', '.join(choices)}")


def contains_word(text: str, word: str) -> bool:
    return word_pattern(word).search(text) is not None


def word_pattern(word: str) -> re.Pattern:
    """`word` as a whole word: not inside a longer word ("TOK" matches "TOK," but not "TOKYO" or "my_TOK")."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


@dataclass(frozen=True)
class TrainingConfig:
    """The trainer's inputs, less the archive itself. Defaults are the contract's."""

    seed: Optional[int] = None
    resolution: int = 512
    train_batch_size: int = 4
    num_train_epochs: int = 4000
    max_train_steps: Optional[int] = 1000  # takes precedence over num_train_epochs; None = epochs decide
    is_lora: bool = True
    unet_learning_rate: float = 1e-6
    ti_lr: float = 3e-4
    lora_lr: float = 1e-4
    lora_rank: int = 32
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 100
    token_string: str = "TOK"
    caption_prefix: str = "a photo of TOK, "
    mask_target_prompts: Optional[str] = None
    crop_based_on_salience: bool = True
    use_face_detection_instead: bool = False
    clipseg_temperature: float = 1.0
    verbose: bool = True
    checkpointing_steps: int = 200
    input_images_filetype: str = "infer"

    def __post_init__(self):
        self._check_types()
        self._check_ranges()
        self._check_words()

    def _check_types(self) -> None:
        for name in ("is_lora", "crop_based_on_salience", "use_face_detection_instead", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(name, f"{getattr(self, name)!r} is not true or false")
        for name in ("token_string", "caption_prefix"):
            if not isinstance(getattr(self, name), str):
                raise InputError(name, f"{getattr(self, name)!r} is not a string")
        if self.mask_target_prompts is not None and not isinstance(self.mask_target_prompts, str):
            raise InputError("mask_target_prompts", f"{self.mask_target_prompts!r} is not a string")

    def _check_ranges(self) -> None:
        if self.seed is not None:
            _check_int("seed", self.seed, *SEED_RANGE)
        _check_int("resolution", self.resolution, *RESOLUTION_RANGE)
        if self.resolution % RESOLUTION_MULTIPLE:
            low = self.resolution - self.resolution % RESOLUTION_MULTIPLE
            raise InputError(
                "resolution",
                f"{self.resolution} is not a multiple of {RESOLUTION_MULTIPLE}; use {low} or {low + RESOLUTION_MULTIPLE}",
            )
        _check_int("train_batch_size", self.train_batch_size, *BATCH_RANGE)
        _check_int("num_train_epochs", self.num_train_epochs, *STEPS_RANGE)
        if self.max_train_steps is not None:
            _check_int("max_train_steps", self.max_train_steps, *STEPS_RANGE)
        _check_int("lora_rank", self.lora_rank, *RANK_RANGE)
        _check_int("lr_warmup_steps", self.lr_warmup_steps, 0, STEPS_RANGE[1])
        _check_int("checkpointing_steps", self.checkpointing_steps, *STEPS_RANGE)
        _check_float("unet_learning_rate", self.unet_learning_rate, 0.0, 1.0, low_inclusive=False)
        _check_float("lora_lr", self.lora_lr, 0.0, 1.0, low_inclusive=False)
        _check_float("ti_lr", self.ti_lr, 0.0, 1.0)  # 0 freezes the new tokens' embeddings
        _check_float("clipseg_temperature", self.clipseg_temperature, *CLIPSEG_TEMPERATURE_RANGE, low_inclusive=False)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("input_images_filetype", self.input_images_filetype, FILETYPES)

    def _check_words(self) -> None:
        if not TOKEN_STRING_PATTERN.match(self.token_string):
            raise InputError(
                "token_string",
                f"{self.token_string!r} is not one word; use 1 to 64 characters without spaces or angle brackets,"
                " e.g. 'TOK'",
            )
        if self.caption_prefix and not contains_word(self.caption_prefix, self.token_string):
            raise InputError(
                "caption_prefix",
                f"{self.caption_prefix!r} does not contain token_string {self.token_string!r} as a word; "
                f"include it (e.g. 'a photo of {self.token_string}, ') or send an empty caption_prefix",
            )

    # Derived values -------------------------------------------------------------------------------------------

    @property
    def new_tokens(self) -> tuple[str, ...]:
        """The tokens the text encoders learn for token_string, in order."""
        return tuple(new_token(i) for i in range(NEW_TOKENS_PER_STRING))

    @property
    def token_map(self) -> dict[str, str]:
        """special_params.json: what a prompt's token_string is replaced with at inference."""
        return {self.token_string: "".join(self.new_tokens)}

    @property
    def trains_text_encoders(self) -> bool:
        """Textual inversion runs (the new rows learn) unless ti_lr is 0; then text embeddings can be cached."""
        return self.ti_lr > 0

    def total_steps(self, steps_per_epoch: int) -> int:
        """max_train_steps takes precedence over num_train_epochs."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        return self.num_train_epochs * steps_per_epoch

    def with_seed(self) -> TrainingConfig:
        """This config with a concrete seed: the one given, or a fresh random one (logged and exported)."""
        return self if self.seed is not None else replace(self, seed=random_seed())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resume_mismatches(self, stored: dict) -> list[str]:
        """Fields whose values differ from a checkpoint's inputs (a random seed adopts the stored one)."""
        problems = []
        for f in fields(self):
            if f.name in RESUME_INDEPENDENT or (f.name == "seed" and self.seed is None):
                continue
            if stored.get(f.name) != getattr(self, f.name):
                problems.append(f"{f.name}: {stored.get(f.name)!r} in the checkpoint, {getattr(self, f.name)!r} now")
        return problems

    @classmethod
    def from_dict(cls, values: dict) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(unknown[0], f"is not a trainer input; allowed: {', '.join(sorted(known))}")
        return cls(**values)
