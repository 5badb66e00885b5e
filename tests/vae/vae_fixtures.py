"""Shared helpers for the VAE tests: the reference data, small random models, diffusers twins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Genmo's own decoder output (../shared/reference/vae-decoder), vendored so a clone of the repository alone passes.
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference" / "vae-decoder"

# Small diffusers VAE: 2 attention heads at width 64, non-uniform widths, one ResBlock per level.
DIFFUSERS_SMALL = dict(
    encoder_block_out_channels=(32, 32, 64, 64),
    decoder_block_out_channels=(64, 32, 32, 32),
    layers_per_block=(1, 1, 2, 1, 1),
)


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread per test: these tensors are tiny, and OpenMP threads on a busy 2-core machine spin
    (a decode measured 20x slower with 2 threads under load). Restored afterwards for other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_dir() -> Path:
    if not (REFERENCE / "decoder.safetensors").is_file() or not (REFERENCE / "case_t3.safetensors").is_file():
        pytest.fail(
            f"reference data not found at {REFERENCE}: it is part of the repository (tests/data/reference/, "
            "Genmo's native decoder output); restore it from git"
        )
    return REFERENCE


def reference_case() -> dict[str, torch.Tensor]:
    return load_file(str(reference_dir() / "case_t3.safetensors"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Deterministic random weights: norm scales near 1, biases small, others ~ scale / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1 and name.endswith("weight"):  # GroupNorm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module.eval().requires_grad_(False)


def diffusers_vae(seed: int = 0, **config):
    """A random diffusers AutoencoderKLMochi (the oracle), small by default."""
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(**{**DIFFUSERS_SMALL, **config})
    return randomize_(vae, seed)


def save_diffusers_vae(folder: Path, vae) -> Path:
    """Write `vae` with diffusers' own save_pretrained, as a model folder would hold it (folder/vae/)."""
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    return folder


def save_native(path: Path, module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Path:
    save_file({k: v.to(dtype).contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


__all__ = [
    "DIFFUSERS_SMALL",
    "REFERENCE",
    "diffusers_vae",
    "randomize_",
    "reference_case",
    "reference_dir",
    "rel",
    "save_diffusers_vae",
    "save_native",
    "single_thread",
]
