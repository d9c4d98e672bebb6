"""gptoss: a from-scratch PyTorch reference implementation of OpenAI's gpt-oss models."""

import sys
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec
from pathlib import Path

# the top-level folders a checkout maps into the package, gptoss.<folder> (pyproject.toml's package-dir
# says the same for a built wheel; tests/test_packaging.py holds the two together)
MAPPED_FOLDERS = ("kernels", "train")


def _map_checkout_folders() -> None:
    """In a checkout (editable install, or the repository root on sys.path), name the top-level folders
    kernels/ and train/ as gptoss.kernels and gptoss.train.

    The folders hold no __init__.py on purpose: Python started in the repository root puts the root first
    on sys.path, and a regular package `kernels` there would shadow Hugging Face's `kernels`, which
    transformers imports. A folder without __init__.py never shadows an installed package (PEP 420), but
    setuptools' editable finder maps only folders with one, so the mapping is made here. A built wheel
    holds them as gptoss/kernels and gptoss/train, and nothing happens."""
    here = Path(__file__).resolve().parent
    if not (here.parent / "pyproject.toml").is_file():
        return
    for name in MAPPED_FOLDERS:
        folder = here.parent / name
        if (here / name).exists() or not folder.is_dir() or f"{__name__}.{name}" in sys.modules:
            continue
        spec = ModuleSpec(f"{__name__}.{name}", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[spec.name] = module = module_from_spec(spec)
        globals()[name] = module


_map_checkout_folders()

from gptoss.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from gptoss.generate import generate  # noqa: E402
from gptoss.load import load_model  # noqa: E402
from gptoss.model import GptOss  # noqa: E402

__all__ = ["PRESETS", "GptOss", "ModelConfig", "generate", "get_preset", "load_model"]
__version__ = "0.1.0"
