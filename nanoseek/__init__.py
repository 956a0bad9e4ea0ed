"""nanoseek: DeepSeek-V3 / R1 in one readable package: train, reason with GRPO, distill, evaluate, self-host."""

from .checkpoint import load_model, save_model
from .config import PRESETS, ModelConfig, get_preset
from .engine.engine import Engine, SamplingParams
from .model import Transformer, build_model

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "build_model", "load_model", "save_model", "Engine",
           "SamplingParams"]
__version__ = "0.1.0"
