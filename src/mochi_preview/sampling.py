"""Flow-matching sampling: the linear-quadratic sigma schedule, initial noise, and the Euler loop with CFG.

Convention: z_sigma = (1 - sigma) * z0 + sigma * noise, sigma = 1 is pure noise, the model predicts v = z0 - noise,
and an Euler step moves z by (sigma_i - sigma_{i+1}) * v. The sampler state stays fp32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def linear_quadratic_schedule(
    num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> list[float]:
    """num_steps + 1 sigmas from 1.0 to 0.0: linear down to 1 - threshold_noise over `linear_steps`, then quadratic."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1; got {num_steps}")
    if num_steps == 1:
        return [1.0, 0.0]
    if linear_steps is None:
        linear_steps = num_steps // 2
    if not 0 < linear_steps < num_steps:
        raise ValueError(f"linear_steps must be in [1, {num_steps - 1}] for {num_steps} steps; got {linear_steps}")
    if not 0.0 <= threshold_noise <= 1.0:
        raise ValueError(f"threshold_noise must be in [0, 1]; got {threshold_noise}")
    lin, tau, n = linear_steps, threshold_noise, num_steps
    quad = n - lin
    d = lin - tau * n
    a = d / (lin * quad**2)
    b = tau / lin - 2 * d / quad**2
    c = a * lin**2
    progress = [i * tau / lin for i in range(lin)] + [a * i**2 + b * i + c for i in range(lin, n)] + [1.0]
    return [1.0 - x for x in progress]


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Validate a custom schedule: at least two values in [0, 1], strictly decreasing."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"a sigma schedule needs at least 2 values (start and end); got {len(sigmas)}")
    if any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError("sigmas must lie in [0, 1] (1 = pure noise, 0 = clean)")
    if any(s0 <= s1 for s0, s1 in zip(sigmas, sigmas[1:])):
        raise ValueError("sigmas must be strictly decreasing (from noise towards data)")
    return sigmas


def latent_shape(num_frames: int, height: int, width: int, channels: int = 12) -> tuple[int, int, int, int]:
    """(C, T, H/8, W/8) DiT latent for a video of num_frames = 6k + 1 frames of height x width pixels."""
    return channels, (num_frames - 1) // 6 + 1, height // 8, width // 8


def get_noise(
    batch: int, num_frames: int, height: int, width: int, seed: int | None = None, generator=None
) -> torch.Tensor:
    """Initial fp32 noise (B, 12, T, H/8, W/8) from a seeded CPU generator: the same seed gives the same video on
    any device (and matches diffusers' MochiPipeline called with a CPU generator of that seed)."""
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
    return torch.randn((batch, *latent_shape(num_frames, height, width)), generator=generator, dtype=torch.float32)


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def cfg_velocity(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigma: float,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Classifier-free guided velocity: v_u + scale * (v_c - v_u), in fp32. `cond`/`uncond` = (features, mask)."""
    b = z.shape[0]
    sig = torch.full((b,), sigma, dtype=torch.float32, device=z.device)
    if uncond is None or scale == 1.0:
        return model(z, sig, *cond).float()
    if batch_cfg:
        feats = _pad_cat(cond[0], uncond[0])
        masks = _pad_cat(cond[1], uncond[1])
        v_c, v_u = model(torch.cat([z, z]), torch.cat([sig, sig]), feats, masks).float().chunk(2)
    else:
        v_c = model(z, sig, *cond).float()
        v_u = model(z, sig, *uncond).float()
    return v_u + scale * (v_c - v_u)


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along the batch, padding the text axis of the shorter one (masks pad with False)."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], n - t.shape[1], *t.shape[2:])], dim=1)
    return torch.cat([pad(a), pad(b)])


def denoise(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigmas: Sequence[float],
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None,
    guidance: float | Sequence[float] = 4.5,
    batch_cfg: bool = False,
    callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Euler integration of the flow from sigmas[0] to sigmas[-1]; `guidance` is a scale or one scale per step.

    `callback(step, sigma_next, z)` runs after each step; a tensor it returns replaces z.
    """
    sigmas = check_sigmas(sigmas)
    steps = len(sigmas) - 1
    scales = [float(guidance)] * steps if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    if len(scales) != steps:
        raise ValueError(f"guidance has {len(scales)} values but there are {steps} steps")
    z = z.float()
    for i in range(steps):
        v = cfg_velocity(model, z, sigmas[i], cond, uncond, scales[i], batch_cfg)
        z = z + (sigmas[i] - sigmas[i + 1]) * v  # the step size is a float64 difference, applied to fp32
        if callback is not None and (replaced := callback(i, sigmas[i + 1], z)) is not None:
            z = replaced.float()
    return z
