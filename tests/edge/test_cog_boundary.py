"""sdxl/ never imports cog: ruff's banned-api rule (TID251, pyproject.toml) fails the lint for any import of cog or
coglet under sdxl/, and only there (the Cog edge, scripts and tests import it)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPORTS = ("import cog", "import cog.types", "from cog import Path", "from cog.types import File", "import coglet")


def ruff_check(source: str, as_path: str) -> subprocess.CompletedProcess:
    """Lint `source` as if it were the file `as_path` (its per-file rules apply); nothing is written."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251", "--stdin-filename", as_path, "-"],
        input=source + "  # noqa: F401\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.parametrize("source", IMPORTS)
@pytest.mark.parametrize("as_path", ["sdxl/probe.py", "sdxl/training/probe.py", "sdxl/model/probe.py"])
def test_an_import_of_cog_inside_sdxl_fails_the_lint(source, as_path):
    result = ruff_check(source, as_path)
    assert result.returncode == 1 and "TID251" in result.stdout and "sdxl/ never imports cog" in result.stdout


@pytest.mark.parametrize(
    "as_path", ["predict.py", "train.py", "cog_inputs.py", "scripts/probe.py", "tests/probe.py", "tools/probe.py"]
)
def test_the_edge_may_import_cog(as_path):
    result = ruff_check("from cog import BaseRunner", as_path)
    assert result.returncode == 0, result.stdout


def test_sdxl_as_it_is_passes_the_rule():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251", "sdxl"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout
