"""The AsymmDiT diffusion transformer and its checkpoints."""

from .model import AsymmDiT, DiTConfig, init_weights
from .weights import infer_dit_config, load_dit, save_dit_native

__all__ = ["AsymmDiT", "DiTConfig", "init_weights", "infer_dit_config", "load_dit", "save_dit_native"]
