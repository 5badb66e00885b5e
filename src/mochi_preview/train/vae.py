"""VAE training: reconstruction (with extra weight on the object and its mean colour) plus a small KL term.

The decoder sees the posterior mean (the sampled latent was too noisy to learn from at demo size), so the KL term
acts as a gentle pull of the latents towards N(0, 1). After training, `latent_stats` measures the per-channel mean
and std of the latents, which play the role of Mochi's published normalization constants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..vae.model import UpsampleBlock
from .common import TrainConfig, Trainer


@dataclass(frozen=True)
class VAETrainConfig(TrainConfig):
    """VAE settings: loss weights and batch size."""

    lr: float = 1e-3
    batch_size: int = 8
    recon_loss: str = "l1"  # "l1" or "mse", per pixel
    object_weight: float = 4.0  # extra weight on object pixels, which cover a few % of the frame
    colour_weight: float = 1.0  # MSE between the object's mean colour in the input and the reconstruction
    edge_weight: float = 0.0  # L1 between the spatial gradients of the input and the reconstruction (crisp outlines)
    kl_weight: float = 1e-4
    sample_posterior: bool = False  # decode mean + std * eps instead of the mean
    train_encoder: bool = True  # False: the encoder is frozen (its latents, and what was trained on them, stay valid)
    # The decoder sees mean + s * noise, s uniform in [0, latent_noise] times each channel's std (over the batch): the
    # DiT's latents are never exactly an encoder's, and a decoder that only saw posterior means draws the difference
    # as stray marks beside the object.
    latent_noise: float = 0.0


def object_mask(x: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 1, T, H, W) float: pixels away from their frame's median colour."""
    background = x.flatten(3).median(dim=-1).values[..., None, None]  # (B, 3, T, 1, 1)
    return ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def spatial_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of (..., H, W) along W and H, both cropped to (..., H - 1, W - 1)."""
    return x[..., :-1, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, :-1]


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, T, H - 1, W - 1): the largest over the colour channels of the gradient's length."""
    gx, gy = spatial_gradients(x)
    return (gx * gx + gy * gy).sqrt().amax(dim=1)


@torch.no_grad()
def edge_sharpness(recon: torch.Tensor, truth: torch.Tensor, threshold: float = 0.25) -> float:
    """Mean gradient magnitude of `recon` on the outlines of `truth` (where its own exceeds `threshold`), as a share
    of truth's there: 1 is as crisp as the rendered clip, a blurred outline less. Both (B, 3, T, H, W) in [-1, 1]."""
    edge = gradient_magnitude(truth)
    band = edge > threshold
    if not band.any():
        raise ValueError("edge_sharpness: the clips have no outline (no gradient above the threshold)")
    return float(gradient_magnitude(recon)[band].mean() / edge[band].mean())


def vae_losses(x: torch.Tensor, recon: torch.Tensor, mean, logvar, cfg: VAETrainConfig) -> dict[str, torch.Tensor]:
    """Loss terms of one batch: weighted reconstruction, object colour, edges, KL (per latent element), plain MSE."""
    err = (recon - x).abs() if cfg.recon_loss == "l1" else (recon - x) ** 2  # (B, 3, T, H, W)
    obj = object_mask(x)  # (B, 1, T, H, W)
    weight = 1.0 + cfg.object_weight * obj
    recon_term = (weight * err).sum() / (weight.sum() * x.shape[1])  # a weighted mean, same scale as err
    area = obj.sum(dim=(2, 3, 4)).clamp_min(1.0)  # (B, 1)
    colour = lambda v: (v * obj).sum(dim=(2, 3, 4)) / area  # (B, 3): mean colour of the object's pixels
    colour_term = F.mse_loss(colour(recon), colour(x))
    edge = sum(F.l1_loss(a, b) for a, b in zip(spatial_gradients(recon), spatial_gradients(x)))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return {"recon": recon_term, "colour": colour_term, "edge": edge, "kl": kl, "mse": F.mse_loss(recon.detach(), x)}


class VAETrainer(Trainer):
    """Trains an Encoder/Decoder pair (mochi_preview.vae) on videos drawn by `sample_videos(rng, n)` (uint8)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        sample_videos: Callable[[np.random.Generator, int], torch.Tensor],
        cfg: VAETrainConfig = VAETrainConfig(),
    ):
        encoder.requires_grad_(cfg.train_encoder)  # before the optimizer is made: frozen tensors are left out
        super().__init__(nn.ModuleDict({"encoder": encoder, "decoder": decoder}), cfg)
        self.encoder, self.decoder, self.sample_videos = encoder, decoder, sample_videos

    def loss(self) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x = self.sample_videos(self.rng, cfg.batch_size).float() / 127.5 - 1.0  # (B, 3, T, H, W) in [-1, 1]
        with torch.set_grad_enabled(cfg.train_encoder):
            mean, logvar = self.encoder(x)  # (B, 12, T', H', W') each
        z = mean
        if cfg.sample_posterior:
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=self.generator)
        if cfg.latent_noise > 0:
            std = mean.detach().std(dim=(0, 2, 3, 4), keepdim=True)  # (1, 12, 1, 1, 1)
            level = cfg.latent_noise * torch.rand((len(z), 1, 1, 1, 1), generator=self.generator)  # (B, 1, 1, 1, 1)
            z = z + level * std * torch.randn(mean.shape, generator=self.generator)
        recon = self.decoder(z)  # the plain network: no tiling or chunking while training
        terms = vae_losses(x, recon, mean, logvar, cfg)
        loss = terms["recon"] + cfg.colour_weight * terms["colour"] + cfg.edge_weight * terms["edge"]
        loss = loss + cfg.kl_weight * terms["kl"]
        psnr = 10 * torch.log10(4.0 / terms["mse"].clamp_min(1e-10))  # the signal spans [-1, 1]: peak^2 = 4
        return loss, {k: v.item() for k, v in terms.items()} | {"psnr": psnr.item()}


@torch.no_grad()
def inflate_time(decoder: nn.Module) -> nn.Module:
    """Give every sub-frame of the decoder's temporal expansions the weights of the last one, in place.

    A decoder trained on single frames only ever keeps the last sub-frame of each depth-to-space-time (those before
    it precede frame 0 and are dropped), so the others are still at their random start. Copied, a still clip decodes
    in every frame as its first frame does: clip training then starts from the single-frame quality and has only
    motion to learn (the encoder and the causal convolutions agree already: on repeated frames they see what the
    replicate padding of a single frame showed them)."""
    for block in decoder.modules():
        if not isinstance(block, UpsampleBlock) or block.d2st.temporal == 1:
            continue
        st, cells = block.d2st.temporal, block.d2st.spatial**2  # the projection's outputs are laid out (c st sh sw)
        for param in (block.proj.weight, block.proj.bias):
            grouped = param.view(-1, st, cells, *param.shape[1:])  # (c, st, sh * sw, ...)
            grouped[:, : st - 1] = grouped[:, st - 1 : st]
    return decoder


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, T, H, W) -> decoded from the posterior mean, float in [-1, 1] (check colours before the DiT)."""
    mean, _ = encoder(videos.float() / 127.5 - 1.0)
    return decoder(mean).float().clamp(-1.0, 1.0)


@torch.no_grad()
def latent_stats(encoder: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (latent_dim,) of the posterior means over uint8 video batches (B, 3, T, H, W)."""
    total, total_sq, count = 0.0, 0.0, 0
    for videos in batches:
        mean, _ = encoder(videos.float() / 127.5 - 1.0)  # (B, C, T, H, W)
        z = mean.double().transpose(0, 1).flatten(1)  # (C, B*T*H*W); float64 sums: many small terms
        total, total_sq, count = total + z.sum(1), total_sq + (z * z).sum(1), count + z.shape[1]
    mu = total / count
    return mu.float(), (total_sq / count - mu * mu).clamp_min(0).sqrt().float()
