"""The validated, frozen trainer inputs: every check a client can fail lives here, before any model is loaded.

Field names, types and defaults are the hosted `stability-ai/sdxl` trainer's (see the API contract). Errors name the
field, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

from sdxl.errors import InputError
from sdxl.formats import ARCHIVE_TYPES, contains_word, new_token
from sdxl.request import SEED_RANGE, random_seed
from sdxl.validation import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, Spec, check_fields, described

LR_SCHEDULERS = ("constant", "linear")
STEPS_RANGE = (1, 1_000_000)
TOKEN_STRING_PATTERN = re.compile(r"^[^\s<>]{1,64}$")  # one word; angle brackets are for the new tokens <s0>, <s1>
NEW_TOKENS_PER_STRING = 2  # <s0><s1> for one token_string, as the hosted trainer does
# Free text goes on to the preprocessing and the training's command line (one argument may hold at most 128 KiB):
# CLIP reads 77 tokens (~300 characters), so these caps leave room and refuse the rest before any work.
MAX_CAPTION_PREFIX_CHARS = 1000
MAX_MASK_PROMPTS_CHARS = 2000

# Inputs that only tune logging and checkpoint cadence: a run may resume from a checkpoint made with other values.
RESUME_INDEPENDENT = ("verbose", "checkpointing_steps")


def _trainer_input(kind: type, description: str, default=None, **allowed) -> Spec:
    """The hosted trainer's schema declares no bounds; they are checked here (the training fails naming the field)."""
    return Spec(kind, description, default, declare_bounds=False, **allowed)


# The trainer's inputs (the hosted stability-ai/sdxl trainer's names and defaults), in the order train.py declares
# them: one definition each, for the declaration and for the checks of TrainingConfig and the preprocessing.
INPUT_IMAGES = Spec(object, "A .zip or .tar file of the training images (optionally a caption.csv)")
SEED = _trainer_input(int, "Random seed for reproducible training; empty for a random one", None,
                      ge=SEED_RANGE[0], le=SEED_RANGE[1], optional=True)  # fmt: skip
RESOLUTION = _trainer_input(int, "Square resolution to train at (multiple of 8)", 512,
                            ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)  # fmt: skip
TRAIN_BATCH_SIZE = _trainer_input(int, "Batch size per device", 4, ge=1, le=64)
NUM_TRAIN_EPOCHS = _trainer_input(int, "Epochs to train; max_train_steps takes precedence", 4000,
                                  ge=STEPS_RANGE[0], le=STEPS_RANGE[1])  # fmt: skip
MAX_TRAIN_STEPS = _trainer_input(int, "Training steps; takes precedence over num_train_epochs", 1000,
                                 ge=STEPS_RANGE[0], le=STEPS_RANGE[1], optional=True)  # fmt: skip
IS_LORA = _trainer_input(bool, "Train a LoRA; false = full fine-tune of the UNet", True)
UNET_LEARNING_RATE = _trainer_input(float, "UNet learning rate for a full fine-tune", 1e-6, gt=0.0, le=1.0)
# 0 freezes the new tokens' embeddings
TI_LR = _trainer_input(float, "Learning rate of the new tokens' embeddings (textual inversion)", 3e-4, ge=0.0, le=1.0)
LORA_LR = _trainer_input(float, "LoRA learning rate", 1e-4, gt=0.0, le=1.0)
LORA_RANK = _trainer_input(int, "LoRA rank", 32, ge=1, le=512)
LR_SCHEDULER = _trainer_input(str, "Learning rate schedule", "constant", choices=LR_SCHEDULERS)
LR_WARMUP_STEPS = _trainer_input(int, "Warmup steps of the linear schedule", 100, ge=0, le=STEPS_RANGE[1])
TOKEN_STRING = _trainer_input(str, "The word that stands for the trained concept", "TOK")
CAPTION_PREFIX = _trainer_input(str, "Prefix of automatic captions; must contain token_string", "a photo of TOK, ",
                                max_chars=MAX_CAPTION_PREFIX_CHARS)  # fmt: skip
MASK_TARGET_PROMPTS = _trainer_input(
    str,
    "What matters in the images (e.g. 'photo of a dog'): CLIPSeg masks the loss to it",
    None,
    optional=True,
    max_chars=MAX_MASK_PROMPTS_CHARS,
)
CROP_BASED_ON_SALIENCE = _trainer_input(
    bool, "Crop around the salient (masked) region; false = around detected faces", True
)
USE_FACE_DETECTION_INSTEAD = _trainer_input(bool, "Face masks instead of CLIPSeg masks", False)
# exclusive low end: a zero temperature would divide by zero
CLIPSEG_TEMPERATURE = _trainer_input(float, "Blur of the CLIPSeg mask (0.5 to 1.0 recommended)", 1.0, gt=0.0, le=10.0)
VERBOSE = _trainer_input(bool, "Log every step", True)
CHECKPOINTING_STEPS = _trainer_input(int, "Steps between checkpoints", 200, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])
INPUT_IMAGES_FILETYPE = _trainer_input(
    str, "Archive type of input_images; infer reads it from the content", "infer", choices=ARCHIVE_TYPES
)


def check_token_words(token_string: str, caption_prefix: str) -> None:
    """token_string is one word, and caption_prefix contains it as a whole word: the contract says the prefix must
    contain token_string (an empty prefix does not), or automatic captions would never show the trained word."""
    if not TOKEN_STRING_PATTERN.match(token_string):
        raise InputError(
            "token_string",
            f"{token_string!r} is not one word; use 1 to 64 characters without spaces or angle brackets, e.g. 'TOK'",
        )
    if not contains_word(caption_prefix, token_string):
        raise InputError(
            "caption_prefix",
            f"{caption_prefix!r} does not contain token_string {token_string!r} as a word; "
            f"include it, e.g. 'a photo of {token_string}, '",
        )


def check_inputs(values) -> None:
    """Check the trainer inputs in `values` (a DatasetInputs: TrainingConfig or the preprocessing's config), each with
    its one definition."""
    check_fields(values)
    check_token_words(values.token_string, values.caption_prefix)


@dataclass(frozen=True)
class DatasetInputs:
    """The trainer inputs that shape the training set: the preprocessing reads them (its PreprocessConfig adds to
    them), and the training keeps them (TrainingConfig adds the rest)."""

    resolution: int = described(RESOLUTION)
    token_string: str = described(TOKEN_STRING)
    caption_prefix: str = described(CAPTION_PREFIX)
    mask_target_prompts: Optional[str] = described(MASK_TARGET_PROMPTS)
    crop_based_on_salience: bool = described(CROP_BASED_ON_SALIENCE)
    use_face_detection_instead: bool = described(USE_FACE_DETECTION_INSTEAD)
    clipseg_temperature: float = described(CLIPSEG_TEMPERATURE)
    input_images_filetype: str = described(INPUT_IMAGES_FILETYPE)

    def __post_init__(self):
        check_inputs(self)


@dataclass(frozen=True)
class TrainingConfig(DatasetInputs):
    """The trainer's inputs, less the archive itself. Defaults are the contract's."""

    seed: Optional[int] = described(SEED)
    train_batch_size: int = described(TRAIN_BATCH_SIZE)
    num_train_epochs: int = described(NUM_TRAIN_EPOCHS)
    max_train_steps: Optional[int] = described(MAX_TRAIN_STEPS)  # takes precedence over num_train_epochs; None = epochs
    is_lora: bool = described(IS_LORA)
    unet_learning_rate: float = described(UNET_LEARNING_RATE)
    ti_lr: float = described(TI_LR)
    lora_lr: float = described(LORA_LR)
    lora_rank: int = described(LORA_RANK)
    lr_scheduler: str = described(LR_SCHEDULER)
    lr_warmup_steps: int = described(LR_WARMUP_STEPS)
    verbose: bool = described(VERBOSE)
    checkpointing_steps: int = described(CHECKPOINTING_STEPS)

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
