"""The AsymmDiT diffusion transformer and its checkpoints."""

from .fp8 import FP8Linear, parameter_bytes, quantize_dit_fp8
from .layout import infer_dit_config, load_dit, save_dit_native
from .model import AsymmDiT, DiTConfig, init_weights

__all__ = [
    "AsymmDiT",
    "DiTConfig",
    "FP8Linear",
    "init_weights",
    "infer_dit_config",
    "load_dit",
    "parameter_bytes",
    "quantize_dit_fp8",
    "save_dit_native",
]
