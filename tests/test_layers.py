"""The import contracts in pyproject.toml ([tool.importlinter]) hold, and they bite: a module that imports from a
stage above its own fails lint-imports (CI runs it after ruff). Checked on a copy of sdxl/ with one such import."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports")
if LINT is None and os.environ.get("CI") == "true":
    raise RuntimeError("CI installs import-linter (requirements-dev.txt), yet lint-imports is not on PATH")
pytestmark = pytest.mark.skipif(LINT is None, reason="lint-imports missing: pip install -r requirements-dev.txt")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages, not this checkout's
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def copy_of_the_library(folder: Path) -> Path:
    for name in ("sdxl", "tools"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", folder)
    return folder


def test_the_layers_hold_on_the_library_as_it_is(tmp_path):
    result = lint(copy_of_the_library(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("guard/url_policy.py", "from sdxl.inputs import request", "never back up"),  # a lower stage reaching up
        ("preprocess/pipeline.py", "from sdxl.training import config", "never back up"),  # the import that went
        ("model/loading.py", "import tools.testing.trained", "development tools"),
    ],
)
def test_an_import_back_up_fails_the_lint_naming_the_contract(tmp_path, module, line, contract):
    root = copy_of_the_library(tmp_path)
    path = root / "sdxl" / module
    path.write_text(path.read_text() + f"\n{line}  # deliberate\n")
    result = lint(root)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout
