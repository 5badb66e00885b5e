"""Training: flow matching for the DiT, reconstruction + KL for the VAE, caption attributes for the text encoder,
and the loop they share."""

from .common import EMA, TrainConfig, Trainer, lr_at, make_optimizer, seed_everything
from .dit import DiTTrainConfig, DiTTrainer, LatentData, encode_latent_data
from .flow import drop_captions, flow_matching_loss, noisy_latents, sample_sigmas
from .text import CaptionClassifier, TextTrainConfig, TextTrainer
from .vae import VAETrainConfig, VAETrainer, inflate_time, latent_stats, object_mask, reconstruct, vae_losses

__all__ = [
    "CaptionClassifier",
    "EMA",
    "DiTTrainConfig",
    "DiTTrainer",
    "LatentData",
    "TrainConfig",
    "TextTrainConfig",
    "TextTrainer",
    "Trainer",
    "VAETrainConfig",
    "VAETrainer",
    "drop_captions",
    "encode_latent_data",
    "flow_matching_loss",
    "inflate_time",
    "latent_stats",
    "lr_at",
    "make_optimizer",
    "noisy_latents",
    "object_mask",
    "reconstruct",
    "sample_sigmas",
    "seed_everything",
    "vae_losses",
]
