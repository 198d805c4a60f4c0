"""Operator settings read from the environment: a bad value fails at once, naming the variable and what is allowed."""

from __future__ import annotations

import os


def positive_int(name: str, default: int, unit: str = "integer") -> int:
    """The environment variable `name` as a positive integer; `default` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} is not allowed; use a positive {unit}")
    return int(value)
