"""Latent normalization between VAE space (what the decoder takes) and DiT space (what the DiT sees)."""

from __future__ import annotations

import torch

# Per-channel statistics of the VAE latents published with Mochi 1 preview (identical in diffusers' config).
LATENTS_MEAN = (
    -0.06730895953510081,
    -0.038011381506090416,
    -0.07477820912866141,
    -0.05565264470995561,
    0.012767231469026969,
    -0.04703542746246419,
    0.043896967884726704,
    -0.09346305707025976,
    -0.09918314763016893,
    -0.008729793427399178,
    -0.011931556316503654,
    -0.0321993391887285,
)
LATENTS_STD = (
    0.9263795028493863,
    0.9248894543193766,
    0.9393059390890617,
    0.959253732819592,
    0.8244560132752793,
    0.917259975397747,
    0.9294154431013696,
    1.3720942357788521,
    0.881393668867029,
    0.9168315692124348,
    0.9185249279345552,
    0.9274757570805041,
)


def _stats(z: torch.Tensor, mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) shaped (C, 1, 1, 1) in z's dtype: the published ones unless a model brings its own."""
    mean = LATENTS_MEAN if mean is None else mean
    std = LATENTS_STD if std is None else std
    if z.ndim != 5 or z.shape[1] != len(mean) or len(std) != len(mean):
        raise ValueError(f"latents must be shaped (B, {len(mean)}, T, H, W); got {tuple(z.shape)}")
    # Held as fp32 and applied in the latents' dtype, as natively; broadcast over (T, H, W).
    mean = torch.as_tensor(mean, dtype=torch.float32).to(z.device, z.dtype)[:, None, None, None]
    std = torch.as_tensor(std, dtype=torch.float32).to(z.device, z.dtype)[:, None, None, None]
    return mean, std


def normalize_latents(z: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """VAE space -> DiT space: (z - mean) / std per channel of (B, 12, T, H, W); published mean/std by default."""
    mean, std = _stats(z, mean, std)
    return (z - mean) / std


def denormalize_latents(z: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """DiT space -> VAE space: z * std + mean per channel of (B, 12, T, H, W); decode the result."""
    mean, std = _stats(z, mean, std)
    return z * std + mean


def load_latent_stats(folder) -> tuple[list[float], list[float]] | None:
    """A model folder's own normalization constants, if it has them: `latent_stats.json` ("mean" and "std" lists),
    else a diffusers folder's `vae/config.json` (`latents_mean`, `latents_std`), as diffusers' pipeline reads them."""
    import json
    from pathlib import Path

    own, diffusers = Path(folder) / "latent_stats.json", Path(folder) / "vae" / "config.json"
    if own.is_file():
        path, keys = own, ("mean", "std")
    elif diffusers.is_file():
        path, keys = diffusers, ("latents_mean", "latents_std")
    else:
        return None
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if path == diffusers and not (isinstance(stats, dict) and all(k in stats for k in keys)):
        return None  # a VAE config without statistics: the published ones apply
    expected = f'{{"{keys[0]}": [{len(LATENTS_MEAN)} numbers], "{keys[1]}": [{len(LATENTS_STD)} positive numbers]}}'
    if not isinstance(stats, dict) or (missing := [k for k in keys if k not in stats]):
        raise ValueError(f"{path}: missing key {missing[0]!r} (expected {expected})" if isinstance(stats, dict)
                         else f"{path}: expected an object {expected}")  # fmt: skip
    try:
        mean, std = [float(x) for x in stats[keys[0]]], [float(x) for x in stats[keys[1]]]
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: {keys[0]!r} and {keys[1]!r} must be lists of numbers (expected {expected})"
        ) from None
    if len(mean) != len(LATENTS_MEAN) or len(std) != len(LATENTS_STD) or min(std) <= 0:
        raise ValueError(f"{path}: expected {expected}; got {len(mean)} means and {len(std)} stds")
    return mean, std
