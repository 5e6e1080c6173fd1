"""ringlinear: Ring-linear hybrid models (Lightning linear + GQA softmax attention, MoE) in PyTorch + Triton."""

from ringlinear.config import PRESETS, RingLinearConfig, preset
from ringlinear.model import RingLinearForCausalLM

__all__ = ["PRESETS", "RingLinearConfig", "RingLinearForCausalLM", "preset"]
__version__ = "0.1.0"
