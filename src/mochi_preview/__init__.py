"""mochi_preview: Genmo's Mochi 1 preview text-to-video model, in clear and lean PyTorch."""

__version__ = "0.1.0"

from .dit import AsymmDiT, DiTConfig, load_dit
from .pipeline import MochiOutput, MochiPipeline
from .sampling import DiTCall, TextCondition, denoise, get_noise, linear_quadratic_schedule
from .text import TextEncoder
from .vae import denormalize_latents, load_vae_decoder, load_vae_encoder, normalize_latents
from .video import export_to_video, read_video

__all__ = [
    "AsymmDiT",
    "DiTCall",
    "DiTConfig",
    "MochiOutput",
    "MochiPipeline",
    "TextCondition",
    "TextEncoder",
    "denoise",
    "denormalize_latents",
    "export_to_video",
    "get_noise",
    "linear_quadratic_schedule",
    "load_dit",
    "load_vae_decoder",
    "load_vae_encoder",
    "normalize_latents",
    "read_video",
]
