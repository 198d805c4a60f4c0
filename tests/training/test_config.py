"""TrainingConfig: the contract's defaults, and every bad input named with its field before any work."""

import dataclasses

import pytest

from sdxl.errors import InputError
from sdxl.formats import contains_word
from sdxl.training.config import TrainingConfig

CONTRACT_DEFAULTS = dict(
    seed=None,
    resolution=512,
    train_batch_size=4,
    num_train_epochs=4000,
    max_train_steps=1000,
    is_lora=True,
    unet_learning_rate=1e-6,
    ti_lr=3e-4,
    lora_lr=1e-4,
    lora_rank=32,
    lr_scheduler="constant",
    lr_warmup_steps=100,
    token_string="TOK",
    caption_prefix="a photo of TOK, ",
    mask_target_prompts=None,
    crop_based_on_salience=True,
    use_face_detection_instead=False,
    clipseg_temperature=1.0,
    verbose=True,
    checkpointing_steps=200,
    input_images_filetype="infer",
)


def test_defaults_are_the_contracts():
    assert TrainingConfig().to_dict() == CONTRACT_DEFAULTS


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("resolution", 500, "500 is not allowed; use a multiple of 8 from 64 to 2048, e.g. 496 or 504"),
        ("resolution", 32, "32 is not allowed; use a multiple of 8 from 64 to 2048"),
        ("resolution", 4096, "4096 is not allowed"),
        ("resolution", 512.0, "not an integer"),
        ("lr_scheduler", "cosine", "not one of constant, linear"),
        ("input_images_filetype", "rar", "not one of infer, zip, tar"),
        ("train_batch_size", 0, "out of range"),
        ("max_train_steps", 0, "out of range"),
        ("num_train_epochs", -1, "out of range"),
        ("lora_rank", 0, "out of range"),
        ("lora_lr", 0.0, "0.0 is out of range; allowed: above 0.0 up to 1.0"),
        ("unet_learning_rate", float("nan"), "not a finite number"),
        ("ti_lr", -1e-4, "out of range"),
        ("lr_warmup_steps", -1, "out of range"),
        ("checkpointing_steps", 0, "out of range"),
        ("clipseg_temperature", 0.0, "out of range"),
        ("seed", -1, "out of range"),
        ("seed", 2**32, "out of range"),
        ("is_lora", "yes", "not true or false"),
        ("token_string", "", "not one word"),
        ("token_string", "two words", "not one word"),
        ("token_string", "<s0>", "not one word"),
        ("caption_prefix", "a photo of, ", "does not contain token_string 'TOK'"),
        ("caption_prefix", "a photo of TOKYO, ", "does not contain token_string 'TOK'"),
        ("caption_prefix", "", "'' does not contain token_string 'TOK' as a word"),
        ("caption_prefix", None, "None is not a string"),
        ("mask_target_prompts", 3, "3 is not a string"),
        # free text is capped before any work (200 KB once passed, then the training's launch failed with E2BIG)
        ("caption_prefix", "a photo of TOK, " + "x" * 200_000, "is 200,016 characters long; at most 1,000 are"),
        ("mask_target_prompts", "a dog " * 40_000, "is 240,000 characters long; at most 2,000 are accepted"),
    ],
)
def test_bad_inputs_name_field_value_and_allowed(field, value, expected):
    with pytest.raises(InputError) as raised:
        TrainingConfig(**{field: value})
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert expected in str(raised.value)


def test_caption_prefix_follows_token_string():
    assert TrainingConfig(token_string="sks", caption_prefix="a photo of sks dog").caption_prefix
    # The contract: the prefix "must contain token_string". An empty one does not (automatic captions would never
    # show the trained word); TrainingConfig and the preprocessing refuse it alike (tests/server/test_train_cog.py).
    with pytest.raises(InputError, match="caption_prefix: '' does not contain token_string 'sks'"):
        TrainingConfig(token_string="sks", caption_prefix="")
    with pytest.raises(InputError, match="caption_prefix"):
        TrainingConfig(token_string="sks")  # the default prefix names TOK


def test_whole_word_matching():
    assert contains_word("a photo of TOK, ", "TOK")
    assert contains_word("TOK", "TOK")
    assert not contains_word("tokyo TOKYO MY_TOK TOK2", "TOK")


def test_seed_resolved_once_and_kept():
    config = TrainingConfig()
    seeded = config.with_seed()
    assert seeded.seed is not None and seeded.with_seed() is seeded
    assert TrainingConfig(seed=5).with_seed().seed == 5


def test_max_train_steps_takes_precedence_over_epochs():
    assert TrainingConfig(num_train_epochs=1, max_train_steps=50).total_steps(steps_per_epoch=3) == 50
    assert TrainingConfig(num_train_epochs=4, max_train_steps=None).total_steps(steps_per_epoch=3) == 12


def test_token_map_and_new_tokens():
    config = TrainingConfig(token_string="sks", caption_prefix="sks")
    assert config.new_tokens == ("<s0>", "<s1>")
    assert config.token_map == {"sks": "<s0><s1>"}


def test_frozen_and_resume_mismatches():
    config = TrainingConfig(seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resolution = 1024
    stored = config.to_dict()
    assert TrainingConfig(seed=1, verbose=False, checkpointing_steps=7).resume_mismatches(stored) == []
    assert TrainingConfig(seed=None).resume_mismatches(stored) == []  # a random seed adopts the checkpoint's
    assert TrainingConfig(seed=2).resume_mismatches(stored) == ["seed: 1 in the checkpoint, 2 now"]


def test_from_dict_rejects_unknown_inputs():
    with pytest.raises(InputError, match="learning_rate: is not a trainer input"):
        TrainingConfig.from_dict({"learning_rate": 1e-4})
