"""Imports gptoss from this checkout without installing it (benchmarks/run_gpu.sh puts this folder on
PYTHONPATH when `pip install -e .` cannot run offline, e.g. setuptools < 70.1 without `wheel`).
It does at import time what the package-dir table of pyproject.toml does at install time:
gptoss -> gptoss/, gptoss.kernels -> kernels/, gptoss.train -> train/."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = {"gptoss": _ROOT / "gptoss", "gptoss.kernels": _ROOT / "kernels", "gptoss.train": _ROOT / "train"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _PACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])


sys.meta_path.insert(0, _CheckoutFinder())
