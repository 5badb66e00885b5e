"""mochi_preview: Genmo's Mochi 1 preview text-to-video model, in clear and lean PyTorch."""

from .dit import AsymmDiT, DiTConfig, load_dit
from .sampling import denoise, get_noise, linear_quadratic_schedule

__all__ = ["AsymmDiT", "DiTConfig", "load_dit", "linear_quadratic_schedule", "get_noise", "denoise"]
