"""gptoss: a from-scratch PyTorch reference implementation of OpenAI's gpt-oss models."""

from gptoss.config import PRESETS, ModelConfig, get_preset
from gptoss.generate import generate
from gptoss.load import load_model
from gptoss.model import GptOss

__all__ = ["PRESETS", "GptOss", "ModelConfig", "generate", "get_preset", "load_model"]
__version__ = "0.1.0"
