"""sdxl.validation: the one set of checkers, and each input checked by one definition wherever it is read."""

import math

import pytest

from sdxl.errors import InputError
from sdxl.preprocess import PreprocessConfig
from sdxl.preprocess.config import CLIPSEG_TEMPERATURE
from sdxl.training.config import SEED, TrainingConfig
from sdxl.validation import Spec, check_int, check_number, check_side


@pytest.mark.parametrize(
    "check, value, message",
    [
        (lambda v: check_int("n", v, 1, 4), True, "n: True is not an integer"),
        (lambda v: check_int("n", v, 1, 4), 5, "n: 5 is out of range; allowed: 1 to 4"),
        (lambda v: check_number("x", v, 0, 1), math.inf, "x: inf is not a finite number"),
        (lambda v: check_number("x", v, 0, 1), "0.5", "x: '0.5' is not a finite number"),
        (lambda v: check_number("x", v, 0.0, 1.0, low_inclusive=False), 0.0, "allowed: above 0.0 up to 1.0"),
        (
            lambda v: check_side("width", v),
            100,
            "width: 100 is not allowed; use a multiple of 8 from 64 to 2048, e.g. 96",
        ),
        (lambda v: check_side("width", v), 2056, "width: 2056 is not allowed; use a multiple of 8 from 64 to 2048"),
    ],
)
def test_checkers_name_field_value_and_allowed(check, value, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as raised:
        check(value)
    assert str(raised.value).startswith(raised.value.field + ": ")


def test_check_number_returns_a_float_and_accepts_the_bounds():
    assert check_number("x", 1, 0, 1) == 1.0 and isinstance(check_number("x", 0, 0, 1), float)


def test_spec_declares_what_it_checks():
    spec = Spec(int, "Steps", 50, ge=1, le=500)
    assert spec.declared() == {"description": "Steps", "default": 50, "ge": 1, "le": 500}
    spec.check("steps", 500)
    with pytest.raises(InputError, match="steps: 501 is out of range; allowed: 1 to 500"):
        spec.check("steps", 501)
    # The trainer's schema declares no bounds (as the hosted trainer's); they are still checked.
    assert SEED.declared() == {"description": SEED.description, "default": None}
    with pytest.raises(InputError, match="seed: -1 is out of range"):
        SEED.check("seed", -1)
    with pytest.raises(InputError, match="clipseg_temperature: 0 is out of range; allowed: above 0.0"):
        CLIPSEG_TEMPERATURE.check("clipseg_temperature", 0)


# Values the trainer's inputs and the preprocessing used to judge differently (or with other words): each is now
# refused by both with the same message, so a training is refused up front or not at all.
@pytest.mark.parametrize(
    "inputs, field",
    [
        (dict(caption_prefix=""), "caption_prefix"),  # the contract: the prefix must contain token_string
        (dict(token_string="<sks>", caption_prefix="a photo of <sks>"), "token_string"),  # <...>: the new tokens
        (dict(resolution=500), "resolution"),
        (dict(clipseg_temperature=11.0), "clipseg_temperature"),
        (dict(use_face_detection_instead="yes"), "use_face_detection_instead"),
        (dict(input_images_filetype="rar"), "input_images_filetype"),
        (dict(mask_target_prompts=3), "mask_target_prompts"),
    ],
)
def test_trainer_and_preprocessing_refuse_alike(inputs, field):
    with pytest.raises(InputError) as by_trainer:
        TrainingConfig(**inputs)
    with pytest.raises(InputError) as by_preprocessing:
        PreprocessConfig(**inputs)
    assert str(by_trainer.value) == str(by_preprocessing.value)
    assert by_trainer.value.field == by_preprocessing.value.field == field
