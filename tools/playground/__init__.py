"""The browser playground: `python -m tools.playground` (in .venv-playground)."""
