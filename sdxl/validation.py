"""Checks of client-given values, each defined once: every one raises InputError naming the field, the value given
and what is allowed. The generation request, the trainer's inputs, the preprocessing and the adapters use these.

`Spec` describes one input once: what an edge declares (description, default, bounds, choices; predict.py and
train.py turn it into Cog's Input) and what the library checks (`Spec.check`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sdxl.errors import InputError

# Image sides: width and height of a generation, and the training resolution. Multiples of the VAE's factor 8.
SIZE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SIDE = 2048


def check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise InputError(field, f"{value!r} is not true or false")


def check_text(field: str, value, max_chars: int | None = None) -> None:
    if not isinstance(value, str):
        raise InputError(field, f"{value!r} is not a string")
    if max_chars is not None and len(value) > max_chars:
        raise InputError(field, f"is {len(value):,} characters long; at most {max_chars:,} are accepted")


def check_int(field: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, f"{value!r} is not an integer")
    if not low <= value <= high:
        raise InputError(field, f"{value} is out of range; allowed: {low} to {high}")


def check_number(field: str, value, low: float, high: float, *, low_inclusive: bool = True) -> float:
    """A finite int or float within [low, high] (or (low, high]); returned as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(field, f"{value!r} is not a finite number")
    if value > high or value < low or (value == low and not low_inclusive):
        allowed = f"{low} to {high}" if low_inclusive else f"above {low} up to {high}"
        raise InputError(field, f"{value} is out of range; allowed: {allowed}")
    return float(value)


def check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise InputError(field, f"{value!r} is not one of {', '.join(choices)}")


def check_side(field: str, value, low: int = MIN_SIDE, high: int = MAX_SIDE, multiple: int = SIZE_MULTIPLE) -> None:
    """An image side: an integer multiple of `multiple` from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(field, f"{value!r} is not an integer")
    if value % multiple or not low <= value <= high:
        near = value - value % multiple
        hint = f", e.g. {near} or {near + multiple}" if value % multiple and low <= near < high else ""
        raise InputError(field, f"{value} is not allowed; use a multiple of {multiple} from {low} to {high}{hint}")


@dataclass(frozen=True)
class Spec:
    """One client input: its type, description, default and what is allowed.

    `ge`/`le` bound numbers (inclusive); `gt` is an exclusive lower bound. `declare_bounds=False` keeps the bounds
    out of the declaration (the hosted trainer's schema declares none) while `check` still enforces them.
    """

    kind: type
    description: str
    default: Any = None
    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    choices: tuple[str, ...] | None = None
    multiple_of: int | None = None
    max_chars: int | None = None
    optional: bool = False  # None is allowed (and means "not given")
    declare_bounds: bool = True

    def check(self, field: str, value) -> None:
        if value is None and self.optional:
            return
        if self.choices is not None:
            check_choice(field, value, self.choices)
        elif self.kind is bool:
            check_bool(field, value)
        elif self.kind is str:
            check_text(field, value, self.max_chars)
        elif self.multiple_of is not None:
            check_side(field, value, self.ge, self.le, self.multiple_of)
        elif self.kind is int:
            check_int(field, value, self.ge, self.le)
        elif self.kind is float and self.gt is not None:
            check_number(field, value, self.gt, self.le, low_inclusive=False)
        elif self.kind is float:
            check_number(field, value, self.ge, self.le)
        else:  # files: read and checked where they are fetched (sdxl.inputs.file_inputs, sdxl.inputs.images)
            raise TypeError(f"{field}: {self.kind.__name__} inputs are checked where they are read")

    def declared(self) -> dict[str, Any]:
        """What an edge declares: description, default and (unless kept out) bounds and choices."""
        declared = {"description": self.description, "default": self.default}
        if self.declare_bounds:
            declared.update({key: bound for key, bound in (("ge", self.ge), ("le", self.le)) if bound is not None})
        if self.choices is not None:
            declared["choices"] = list(self.choices)
        return declared


def described(spec: Spec):
    """A dataclass field for the input `spec` describes: its default, and the spec that `check_fields` checks."""
    return dataclasses.field(default=spec.default, metadata={"spec": spec})


def check_fields(values) -> None:
    """Check each field of the dataclass `values` that carries a spec (see `described`), in the fields' order."""
    for item in dataclasses.fields(values):
        if "spec" in item.metadata:
            item.metadata["spec"].check(item.name, getattr(values, item.name))
