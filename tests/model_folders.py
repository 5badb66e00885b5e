"""Complete tiny Mochi model folders in both real layouts, shared by the pipeline, CLI and UI tests."""

from __future__ import annotations

from pathlib import Path

import torch
from dit_fixtures import randomize_, save_diffusers_transformer

from mochi_preview.tiny import save_random_model, save_tiny_t5_diffusers_layout

TINY_VAE = dict(
    encoder_block_out_channels=(32, 32, 32, 32),
    decoder_block_out_channels=(32, 32, 32, 32),
    layers_per_block=(1, 1, 1, 1, 1),
)


def diffusers_vae(seed: int = 2):
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(**TINY_VAE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # GroupNorm weights near 1, everything else small: decoded values stay in range
        for name, p in sorted(vae.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return vae.eval()


def save_diffusers_model(folder: Path) -> Path:
    """transformer/ (the DiT fixture), vae/, text_encoder/, tokenizer/: the genmo/mochi-1-preview layout."""
    save_diffusers_transformer(folder)
    diffusers_vae().save_pretrained(folder / "vae", safe_serialization=True)
    save_tiny_t5_diffusers_layout(folder)
    return folder


def save_native_model(folder: Path) -> Path:
    return save_random_model(folder)


__all__ = ["diffusers_vae", "randomize_", "save_diffusers_model", "save_native_model"]
