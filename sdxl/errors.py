"""Errors a client can fix: each names the input field, the value given and what is allowed."""


class InputError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NSFWError(RuntimeError):
    """Every output was flagged by the safety checker."""
