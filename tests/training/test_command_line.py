"""`python -m sdxl.training`'s options: every trainer input is an option of its own name, and what launch.py writes for
the processes it starts reads back as the same inputs (None, booleans and empty strings included)."""

from dataclasses import fields

import pytest

from sdxl.training.__main__ import _parser
from sdxl.training.config import TrainingConfig
from sdxl.training.launch import TrainingRun
from tools.testing.training_support import small_config


def parse(arguments: list[str]):
    return _parser().parse_args(["--dataset", "d", "--output-dir", "o", *arguments])


def config_of(args) -> TrainingConfig:
    return TrainingConfig(**{f.name: getattr(args, f.name) for f in fields(TrainingConfig)})


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": 11},
        # caption_prefix must contain token_string (the contract), so it is never empty; its spaces survive argv
        {"seed": 0, "max_train_steps": None, "mask_target_prompts": None, "caption_prefix": " TOK ", "is_lora": False},
        {"seed": 2**32 - 1, "mask_target_prompts": "a face", "verbose": False, "ti_lr": 0.0, "lr_scheduler": "linear"},
    ],
)
def test_what_launch_writes_reads_back_as_the_same_inputs(tmp_path, overrides):
    config = small_config(**overrides)
    args = _parser().parse_args(TrainingRun(config, tmp_path / "d", tmp_path / "w", tmp_path / "o").arguments())
    assert config_of(args) == config
    assert (args.dataset, args.output_dir, args.weights) == (tmp_path / "d", tmp_path / "o", tmp_path / "w")


def test_defaults_are_the_contracts():
    args = parse([])
    assert config_of(args) == TrainingConfig()
    assert (args.num_processes, args.keep_checkpoints, args.no_checkpoints, args.tar) == (1, False, False, None)


@pytest.mark.parametrize("word, value", [("true", True), ("True", True), ("yes", True), ("1", True), ("false", False),
                                         ("FALSE", False), ("no", False), ("0", False)])  # fmt: skip
def test_booleans_are_words(word, value):
    assert parse(["--is_lora", word]).is_lora is value


@pytest.mark.parametrize("arguments", [["--is_lora", "maybe"], ["--seed", "none1"], ["--resolution", "1.5"]])
def test_a_bad_value_is_a_usage_error_naming_the_option(arguments, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(arguments)
    assert exit_.value.code == 2 and f"argument {arguments[0]}" in capsys.readouterr().err


def test_shell_options():
    args = parse(["--num-processes", "2", "--keep-checkpoints", "--no-checkpoints", "--tar", "t.tar", "--weights", "w"])
    assert (args.num_processes, args.keep_checkpoints, args.no_checkpoints) == (2, True, True)
    assert (str(args.tar), str(args.weights)) == ("t.tar", "w")
