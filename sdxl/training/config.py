"""The validated, frozen trainer inputs: every check a client can fail lives here (the inputs that shape the
training set in sdxl.preprocess.config, which TrainingConfig extends), before any model is loaded.

Field names, types and defaults are the hosted `stability-ai/sdxl` trainer's (see the API contract). Errors name the
field, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Optional

from sdxl.errors import InputError
from sdxl.formats import new_token
from sdxl.inputs.request import SEED_RANGE, random_seed
from sdxl.preprocess.config import DatasetInputs
from sdxl.preprocess.config import trainer_input as _trainer_input
from sdxl.validation import Spec, described

LR_SCHEDULERS = ("constant", "linear")
STEPS_RANGE = (1, 1_000_000)
NEW_TOKENS_PER_STRING = 2  # <s0><s1> for one token_string, as the hosted trainer does

# Inputs that only tune logging and checkpoint cadence: a run may resume from a checkpoint made with other values.
RESUME_INDEPENDENT = ("verbose", "checkpointing_steps")


# The trainer's inputs (the hosted stability-ai/sdxl trainer's names and defaults), in the order train.py declares
# them: one definition each, for the declaration and for the checks of TrainingConfig and the preprocessing.
INPUT_IMAGES = Spec(object, "A .zip or .tar file of the training images (optionally a caption.csv)")
SEED = _trainer_input(int, "Random seed for reproducible training; empty for a random one", None,
                      ge=SEED_RANGE[0], le=SEED_RANGE[1], optional=True)  # fmt: skip
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
VERBOSE = _trainer_input(bool, "Log every step", True)
CHECKPOINTING_STEPS = _trainer_input(int, "Steps between checkpoints", 200, ge=STEPS_RANGE[0], le=STEPS_RANGE[1])


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
