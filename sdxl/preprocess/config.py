"""The trainer inputs that shape the training set, and the cap on its images: the preprocessing checks and reads
them; the training keeps them (sdxl.training.config's TrainingConfig extends DatasetInputs with the rest).

Field names, types and defaults are the hosted `stability-ai/sdxl` trainer's (see the API contract). Errors name the
field, the value given and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from sdxl import settings
from sdxl.errors import InputError
from sdxl.formats import ARCHIVE_TYPES, contains_word
from sdxl.validation import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, Spec, check_fields, described

MAX_IMAGES_ENV = "SDXL_MAX_TRAINING_IMAGES"
DEFAULT_MAX_IMAGES = 500


def max_training_images() -> int:
    """The most images a training takes (SDXL_MAX_TRAINING_IMAGES, default 500)."""
    return settings.positive_int(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES)


TOKEN_STRING_PATTERN = re.compile(r"^[^\s<>]{1,64}$")  # one word; angle brackets are for the new tokens <s0>, <s1>
# Free text goes on to the preprocessing and the training's command line (one argument may hold at most 128 KiB):
# CLIP reads 77 tokens (~300 characters), so these caps leave room and refuse the rest before any work.
MAX_CAPTION_PREFIX_CHARS = 1000
MAX_MASK_PROMPTS_CHARS = 2000


def trainer_input(kind: type, description: str, default=None, **allowed) -> Spec:
    """The hosted trainer's schema declares no bounds; they are checked here (the training fails naming the field)."""
    return Spec(kind, description, default, declare_bounds=False, **allowed)


RESOLUTION = trainer_input(int, "Square resolution to train at (multiple of 8)", 512,
                            ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)  # fmt: skip

TOKEN_STRING = trainer_input(str, "The word that stands for the trained concept", "TOK")

CAPTION_PREFIX = trainer_input(str, "Prefix of automatic captions; must contain token_string", "a photo of TOK, ",
                               max_chars=MAX_CAPTION_PREFIX_CHARS)  # fmt: skip

MASK_TARGET_PROMPTS = trainer_input(
    str,
    "What matters in the images (e.g. 'photo of a dog'): CLIPSeg masks the loss to it",
    None,
    optional=True,
    max_chars=MAX_MASK_PROMPTS_CHARS,
)

CROP_BASED_ON_SALIENCE = trainer_input(
    bool, "Crop around the salient (masked) region; false = around detected faces", True
)

USE_FACE_DETECTION_INSTEAD = trainer_input(bool, "Face masks instead of CLIPSeg masks", False)

CLIPSEG_TEMPERATURE = trainer_input(float, "Blur of the CLIPSeg mask (0.5 to 1.0 recommended)", 1.0, gt=0.0, le=10.0)

INPUT_IMAGES_FILETYPE = trainer_input(
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
