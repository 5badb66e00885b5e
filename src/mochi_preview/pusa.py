"""Pusa V0.5: Mochi 1 preview fine-tuned to take one sigma per latent frame, and the sampler that feeds it.

Pusa V0.5 (`RaphaelLiu/Pusa-V0.5`, Apache-2.0) is a full fine-tune saved as `pusa_v0_dit.safetensors` with the native
key names, so `load_dit` reads it as it is, and `AsymmDiT.forward` takes its sigma (B, T). Every latent frame t has
its own noise level: it starts at (1 - sigma_t) x_t + sigma_t eps and each Euler step moves it by its own d sigma_t.
Conditioning frames (an image, the start of a video to extend, keyframes) hold their latents x_t at
sigma * noise_multiplier (0 keeps them clean; Pusa's examples use 0 to 0.4, more noise for more motion); the other
frames follow the schedule from pure noise. With no conditioning frame it is Mochi's own text-to-video sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .sampling import DiTHook, TextCondition, cfg_velocity, check_sigmas, guidance_per_step

PUSA_DIT_FILE = "pusa_v0_dit.safetensors"
TASKS = ("text_to_video", "image_to_video", "extension")


def is_pusa_folder(folder: str | Path) -> bool:
    """Whether a model folder holds Pusa V0.5's DiT (which then replaces any dit.safetensors beside it)."""
    return (Path(folder) / PUSA_DIT_FILE).is_file()


def dit_file(folder: str | Path) -> Path:
    """What to pass to `load_dit` for a model folder: Pusa's DiT file when the folder has one, else the folder."""
    folder = Path(folder)
    return folder / PUSA_DIT_FILE if is_pusa_folder(folder) else folder


def conditioned_frames(task: str, num_latent_frames: int, num_cond: int = 1) -> tuple[int, ...]:
    """The latent frames a task conditions: none (text to video), frame 0 (image to video), or the first
    `num_cond` (extension: the latents of the video's last 6 (num_cond - 1) + 1 frames)."""
    if task == "text_to_video":
        return ()
    if task == "image_to_video":
        return (0,)
    if task == "extension":
        if not 1 <= num_cond < num_latent_frames:
            raise ValueError(
                f"extension conditions 1 to {num_latent_frames - 1} of the {num_latent_frames} latent frames "
                f"(at least one is left to generate); got num_cond={num_cond}"
            )
        return tuple(range(num_cond))
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


def frame_sigmas(
    sigmas: Sequence[float], num_frames: int, cond_frames: Sequence[int] = (), noise_multiplier: float = 0.0
) -> torch.Tensor:
    """The per-frame schedule (steps + 1, T), float64: row i holds every latent frame's sigma at step i, the
    conditioning frames' at sigma * noise_multiplier, the others' at sigma."""
    sigmas = check_sigmas(sigmas)
    cond_frames = check_cond_frames(cond_frames, num_frames)
    if not 0.0 <= noise_multiplier <= 1.0:
        raise ValueError(
            f"noise_multiplier must be in [0, 1] (0: clean conditioning frames; Pusa uses 0 to 0.4); got "
            f"{noise_multiplier}"
        )
    table = torch.tensor(sigmas, dtype=torch.float64)[:, None].repeat(1, num_frames)  # (S + 1, T)
    table[:, list(cond_frames)] *= noise_multiplier
    return table


def check_cond_frames(cond_frames: Sequence[int], num_frames: int) -> tuple[int, ...]:
    """Distinct latent frame indices in [0, T), leaving at least one frame to generate."""
    frames = tuple(int(f) for f in cond_frames)
    if any(not 0 <= f < num_frames for f in frames) or len(set(frames)) != len(frames):
        raise ValueError(f"cond_frames must be distinct latent frame indices in [0, {num_frames}); got {frames}")
    if len(frames) == num_frames:
        raise ValueError(f"cond_frames covers all {num_frames} latent frames: nothing is left to generate")
    return frames


def start_latents(
    noise: torch.Tensor,
    cond_latents: torch.Tensor | None = None,
    cond_frames: Sequence[int] = (),
    sigma0: float = 1.0,
    noise_multiplier: float = 0.0,
) -> torch.Tensor:
    """The sampler's first latents (B, C, T, h, w) fp32: sigma0 * noise, except the conditioning frames at
    (1 - s) x + s noise with s = sigma0 * noise_multiplier; `cond_latents` (B, C, K, h, w) holds their K latents
    (normalised DiT latents), in the order of `cond_frames`."""
    cond_frames = check_cond_frames(cond_frames, noise.shape[2])
    z = sigma0 * noise.float()  # (B, C, T, h, w)
    if not cond_frames:
        return z
    if cond_latents is None or cond_latents.shape[2] != len(cond_frames) or cond_latents.shape[3:] != z.shape[3:]:
        shape = None if cond_latents is None else tuple(cond_latents.shape)
        raise ValueError(f"cond_latents must be (B, C, {len(cond_frames)}, {z.shape[3]}, {z.shape[4]}); got {shape}")
    s = sigma0 * noise_multiplier
    idx = list(cond_frames)
    z[:, :, idx] = (1.0 - s) * cond_latents.float().to(z.device) + s * noise[:, :, idx].float()
    return z


def per_frame(model: Callable[..., torch.Tensor], sigma: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The model called with one sigma per latent frame, `sigma` (T,), in place of the sampler's one per video."""

    def call(z, _sigma, features, mask):
        return model(z, sigma.to(z.device).expand(z.shape[0], -1), features, mask)  # sigma (B, T)

    return call


def denoise_per_frame(
    model: Callable[..., torch.Tensor],
    z: torch.Tensor,
    sigmas: Sequence[float],
    cond: TextCondition,
    uncond: TextCondition | None = None,
    guidance: float | Sequence[float] = 4.5,
    cond_frames: Sequence[int] = (),
    noise_multiplier: float = 0.0,
    batch_cfg: bool = False,
    callback: Callable[[int, float, torch.Tensor], torch.Tensor | None] | None = None,
    dit_hook: DiTHook | None = None,
) -> torch.Tensor:
    """`sampling.denoise` with one sigma per latent frame: every frame steps by its own d sigma (see the module).

    `z` comes from `start_latents`. `callback(step, sigma_next, z)` and `dit_hook` work as in `sampling.denoise`;
    both see the generated frames' sigma. With no conditioning frame this is `sampling.denoise`, bit for bit.
    """
    sigmas = check_sigmas(sigmas)
    scales = guidance_per_step(guidance, len(sigmas) - 1)
    table = frame_sigmas(sigmas, z.shape[2], cond_frames, noise_multiplier)  # (S + 1, T) float64
    steps = (table[:-1] - table[1:]).float().to(z.device)  # (S, T): each frame's d sigma, a float64 difference
    z = z.float()
    for i, scale in enumerate(scales):
        model_i = per_frame(model, table[i].float())
        v = cfg_velocity(model_i, z, sigmas[i], cond, uncond, scale, batch_cfg, i, dit_hook, num_steps=len(scales))
        z = z + steps[i][:, None, None] * v  # (B, C, T, h, w)
        if callback is not None and (replaced := callback(i, sigmas[i + 1], z)) is not None:
            z = replaced.float()
    return z
