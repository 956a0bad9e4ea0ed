"""The DeepSeek-V3 model: MLA attention, DeepSeekMoE, multi-token prediction."""

from .transformer import Transformer, build_model, param_counts

__all__ = ["Transformer", "build_model", "param_counts"]
