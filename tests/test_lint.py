"""`make lint` in the suite: ruff's checks and its formatter over every Python folder of the project (the
settings in pyproject.toml: line length, isort with gptoss first-party). `# fmt: skip` is kept for tables
whose columns the formatter would break."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["gptoss", "kernels", "train", "tests", "benchmarks"]

needs_ruff = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (the [dev] extra; make installs it)"
)


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *FOLDERS], cwd=ROOT, capture_output=True, text=True)


@needs_ruff
def test_ruff_check_passes():
    done = ruff("check", "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@needs_ruff
def test_every_file_is_as_ruff_formats_it():
    done = ruff("format", "--check", "--no-cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
