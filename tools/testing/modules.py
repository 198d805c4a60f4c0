"""Load a script or a deploy/ module from its file, the way the tests read commands that are not in a package."""

import importlib.util
from pathlib import Path
from types import ModuleType


def load_file(name: str, path: Path) -> ModuleType:
    """The module in `path`, imported under `name` (a fresh module each call)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
