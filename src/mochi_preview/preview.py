"""Previews while sampling: a cheap latent -> RGB projection, fitted once per VAE decoder, and small preview images.

The projection is affine per latent pixel, in the decoder's (unnormalised) latent space: rgb = weight @ z + bias,
with rgb the mean colour, in [0, 1], of the video pixels that latent pixel decodes to (latent frame 0 -> frame 0,
latent frame k >= 1 -> frames 6k-5 ... 6k; an 8x8 block). It is fitted by least squares on one small decode
(7 frames of 32 x 512 pixels): the VAE encoder's latents of a seeded still video of simple panels (a dark colour
with a rectangle of any colour), so the latents lie where the decoder's real inputs do; a model without an encoder
fits on seeded N(0, 1) latents instead (normalised space, then denormalised). The fit is cached per decoder object.
How well an affine map does depends on the decoder. Demo decoders (bench/RESULTS.md, "Live preview" and "Demo model
rebuild groundwork" §8-9): mean colour error on held-out panels 0.035 against 0.054 for the best constant colour on
the one of 9-14 px objects, 0.054 against 0.051 on the next (13-19 px), whose colours are further from affine, and
0.054 against 0.045 on the shipped one (its decoder, fine-tuned on noisy latents, draws these off-world panels close
to a constant); on its encoded clips the map still finds the object (IoU 0.82 with the decoded truth; 0.77 on the
one before). So the preview shows where things are, and their colour only as far as the decoder is affine.

During sampling the preview shows the clean latents the last step predicts, x0 = z - sigma * dz/dsigma, with
dz/dsigma read from two consecutive latents (Euler steps move along the predicted velocity); at the first step,
which has no previous latents, it shows the current ones.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import write_atomic
from .geometry import MOCHI
from .vae import denormalize_latents

FIT_SEED = 0
FIT_VIDEOS = 16  # panels of the one small video the projection is fitted on
FIT_SIZE = (7, 32, 32)  # frames, height, width of each: 2 x 4 x 4 latent pixels
PREVIEW_FRAMES = 4  # latent frames shown side by side
PREVIEW_SIZE = 256  # each frame is upscaled by a whole factor to about this many pixels on its long side
_fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> Projection


@dataclass(frozen=True)
class Projection:
    """rgb = weight @ z + bias for each latent pixel z (decoder space); rgb in [0, 1]."""

    weight: torch.Tensor  # (3, C)
    bias: torch.Tensor  # (3,)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) decoder-space latents -> (B, 3, T, H, W) colours, not clamped."""
        w, b = self.weight.to(z.device, torch.float32), self.bias.to(z.device, torch.float32)
        return torch.einsum("oc,bcthw->bothw", w, z.float()) + b[:, None, None, None]


def block_means(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames (B, T', H', W', 3) in [0, 1] -> the mean colour each latent pixel decodes to, (B, 3, T, H, W)."""
    x = frames.float().permute(0, 4, 1, 2, 3)  # (B, 3, T', H', W')
    s = MOCHI.spatial
    x = F.avg_pool3d(x, (1, s, s))
    first, rest = x[:, :, :1], x[:, :, 1:]
    rest = rest.unflatten(2, (-1, MOCHI.temporal)).mean(dim=3)
    return torch.cat([first, rest], dim=2)


def simple_video(n: int, generator: torch.Generator) -> np.ndarray:
    """A still uint8 video (T, H, n * W, 3): `n` FIT_SIZE panels side by side, each a random dark colour with a
    rectangle of any colour (most videos are darker around their subject)."""
    t, h, w = FIT_SIZE
    panels = []
    for _ in range(n):
        back, front = torch.randint(0, 256, (2, 3), generator=generator, dtype=torch.uint8)
        back //= 8
        top, left = torch.randint(0, h // 2, (2,), generator=generator).tolist()
        height, width = torch.randint(h // 8, h // 2, (2,), generator=generator).tolist()
        panel = back.expand(t, h, w, 3).clone()
        panel[:, top : top + height, left : left + width] = front
        panels.append(panel)
    return torch.cat(panels, dim=2).numpy()


def fit_latents(pipe, n: int = FIT_VIDEOS, seed: int = FIT_SEED) -> torch.Tensor:
    """Decoder-space latents (1, C, T, H, W) to fit on: the VAE encoder's latents of a `simple_video` when the model
    has an encoder (the decoder's own latent manifold), else N(0, 1) in the normalised space, constant over 2x2
    latent blocks. One encode, of `n` panels side by side."""
    g = torch.Generator().manual_seed(seed)
    stats = pipe.latent_stats or (None, None)
    try:
        pipe._check_encoder()
    except FileNotFoundError:
        _, t, h, w = MOCHI.latent_shape(*FIT_SIZE)
        z = torch.randn(1, MOCHI.channels, t, h // 2, n * w // 2, generator=g)
        return denormalize_latents(z.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4), *stats)
    return denormalize_latents(pipe._encode_pixels(simple_video(n, g)), *stats)


def fit_projection(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> Projection:
    """Least-squares fit of the affine latent -> mean colour map on the decode of `latents` (B, C, T, H, W),
    decoder space; `decode(z)`: latents -> frames (B, T', H', W', 3) in [0, 1]."""
    colours = block_means(decode(latents).cpu())
    x = latents.permute(0, 2, 3, 4, 1).reshape(-1, latents.shape[1]).double().cpu()
    y = colours.permute(0, 2, 3, 4, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1), y).solution
    return Projection(solution[:-1].T.float().contiguous(), solution[-1].float())


def decode_fn(pipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pipeline's decoder as `fit_projection` calls it."""
    return lambda z: pipe.decode(z, "pt", denormalize=False).permute(0, 1, 3, 4, 2)


def projection_for(pipe) -> Projection:
    """The pipeline's decoder's projection: fitted at first use (a few small decodes), then cached per decoder."""
    fit = _fits.get(pipe.decoder)
    if fit is None:
        with torch.inference_mode():
            fit = _fits[pipe.decoder] = fit_projection(decode_fn(pipe), fit_latents(pipe))
    return fit


def preview_image(
    latents: torch.Tensor, projection: Projection, mean=None, std=None, frames: int = PREVIEW_FRAMES
) -> np.ndarray:
    """Normalised latents (B, C, T, H, W) -> a uint8 (B * H * k, n * W * k, 3) image: `frames` latent frames evenly
    spaced from first to last, side by side, one row per video, upscaled k times by nearest neighbour."""
    _, _, t, h, w = latents.shape
    picked = torch.linspace(0, t - 1, min(frames, t)).round().long().unique().to(latents.device)
    rgb = projection(denormalize_latents(latents.index_select(2, picked).float(), mean, std))
    rgb = rgb.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()  # (B, 3, n, H, W)
    k = max(1, PREVIEW_SIZE // max(h, w))
    image = rgb.permute(0, 3, 2, 4, 1).reshape(rgb.shape[0] * h, len(picked) * w, 3)  # (B*H, n*W, 3)
    return image.repeat_interleave(k, dim=0).repeat_interleave(k, dim=1).numpy()


def predicted_clean(z: torch.Tensor, previous: torch.Tensor, sigma, previous_sigma) -> torch.Tensor:
    """x0 = z - sigma * dz/dsigma, with dz/dsigma from the Euler step that led from `previous` to `z`."""
    sigma, previous_sigma = float(sigma), float(previous_sigma)
    return z - sigma * (z - previous) / (sigma - previous_sigma)


class Previewer:
    """A `callback_on_step_end` that hands `show` a preview image every `every` steps and after the last step."""

    def __init__(self, show: Callable[[np.ndarray], None], every: int = 1):
        if every < 1:
            raise ValueError(f"--preview_every must be a whole number of steps >= 1; got {every}")
        self.show, self.every = show, every
        self.projection: Projection | None = None
        self.previous: torch.Tensor | None = None

    def prepare(self, pipe) -> Previewer:
        """Fit (or fetch) the projection before sampling starts, so the decoder does not run mid-sampling."""
        self.projection, self.previous = projection_for(pipe), None
        return self

    def __call__(self, pipe, i, t, state):
        z, sigmas = state["latents"], pipe.scheduler.sigmas
        if (i + 1) % self.every == 0 or i + 2 == len(sigmas):
            x0 = z if self.previous is None else predicted_clean(z, self.previous, sigmas[i + 1], sigmas[i])
            projection = self.projection or projection_for(pipe)
            self.show(preview_image(x0, projection, *(pipe.latent_stats or (None, None))))
        self.previous = z


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write (replace) a PNG atomically: a reader sees the previous preview or the new one, never half of one."""
    from PIL import Image

    return write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), replace=True)
