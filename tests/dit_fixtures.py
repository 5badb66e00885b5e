"""Tiny DiTs with random weights, saved in the real checkpoint layouts, shared by the DiT tests."""

from __future__ import annotations

from pathlib import Path

import torch

# Reduced sizes that keep every structural feature: 3 blocks (the last one text-frozen), head_dim 128,
# a text width different from the visual width, a T5 width different from both, MLP widths that differ
# between diffusers' formula (682, 341) and native rounding (768, 512): the loader must read them from the weights.
TINY = dict(num_layers=3, num_attention_heads=2, attention_head_dim=128, pooled_projection_dim=128, text_embed_dim=64)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random values in every parameter (norm weights around 1, frequencies spread, biases nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "pos_frequencies":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return module


def diffusers_transformer(seed: int = 0):
    from diffusers import MochiTransformer3DModel

    return randomize_(MochiTransformer3DModel(**TINY), seed).eval()


def save_diffusers_transformer(folder: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Save a random diffusers transformer to folder/transformer (sharded if max_shard_size is given)."""
    model = diffusers_transformer(seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder / "transformer", safe_serialization=True, **kwargs)
    return folder / "transformer"


def text_inputs(batch: int, length: int = 16, dim: int = 64, valid=(5, 9), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        mask[i, : valid[i % len(valid)]] = True
    return feats, mask
