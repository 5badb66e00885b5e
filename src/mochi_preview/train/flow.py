"""The flow-matching objective of Mochi (spec 5.2 and 7.5): z_s = (1 - s) z0 + s eps, target v = z0 - eps.

s = 1 is pure noise, as in the sampler. The reference trainer draws s ~ U(0, 1) and takes the unweighted MSE. A shift
k > 1 moves the drawn levels towards noise, s -> k s / (1 + (k - 1) s) (the shift of SD3 and diffusers' schedulers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SIGMA_SAMPLERS = ("uniform", "logit_normal")


def sample_sigmas(
    n: int, generator: torch.Generator, kind: str = "uniform", loc: float = 0.0, scale: float = 1.0
) -> torch.Tensor:
    """(n,) noise levels in (0, 1): uniform (the reference), or logit-normal sigmoid(loc + scale * N(0, 1))."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    if kind == "logit_normal":  # more weight on middle noise levels, where the velocity is hardest to guess
        return torch.sigmoid(loc + scale * torch.randn(n, generator=generator))
    raise ValueError(f"unknown sigma sampler {kind!r}; choose from {SIGMA_SAMPLERS}")


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """k s / (1 + (k - 1) s): 0 and 1 stay put, k > 1 spends more of the levels near noise (shift 1: unchanged)."""
    return sigma if shift == 1.0 else shift * sigma / (1.0 + (shift - 1.0) * sigma)


def drop_captions(
    features: torch.Tensor, mask: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p per sample, zero the text (features (B, L, D) or token ids (B, L)) and its mask: the
    "no text" prompt CFG contrasts with."""
    drop = torch.rand(features.shape[0], generator=generator) < p  # (B,)
    return features.masked_fill(drop.view(-1, *[1] * (features.ndim - 1)), 0), mask & ~drop[:, None]


def noisy_latents(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_sigma = (1 - sigma) z0 + sigma noise, sigma (B,) broadcast over (C, T, H, W)."""
    s = sigma.view(-1, *[1] * (z0.ndim - 1))
    return (1.0 - s) * z0 + s * noise


def flow_matching_loss(
    model: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    features: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    sigma_sampler: str = "uniform",
    sigma_shift: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MSE between the model's velocity at a random noise level and z0 - eps; z0 (B, C, T, H, W) in DiT space.

    The random draws happen where z0 is (the CPU generator's stream, whatever the device); the model runs on `device`.
    """
    sigma = shift_sigmas(sample_sigmas(z0.shape[0], generator, sigma_sampler), sigma_shift)  # (B,)
    noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype)
    to = lambda t: t.to(device) if device is not None else t
    v = model(to(noisy_latents(z0, noise, sigma)), to(sigma), to(features), to(mask))  # (B, C, T, H, W) fp32
    return F.mse_loss(v.float(), to(z0 - noise).float())
