"""DiT training on pre-encoded data: the VAE and the text encoder run once per clip, not once per step.

`encode_latent_data` turns (video, caption) batches into a `LatentData` cache (DiT-space latents, text features and
masks), which can be saved to one safetensors file; `DiTTrainer` draws batches from it with its own generator.
Given a text encoder, `DiTTrainer` runs it (`CaptionedDiT`: trained along, or frozen) on the captions at every step
instead of using the cached features, optionally on fresh captions for the drawn clips (`recaption`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..dit import AsymmDiT
from .common import TrainConfig, Trainer
from .flow import drop_captions, flow_matching_loss


@dataclass
class LatentData:
    """Pre-encoded training set, latents already normalized to DiT space (per-channel (z - mean) / std)."""

    mean: torch.Tensor  # (N, 12, T, H, W) posterior means
    features: torch.Tensor  # (N, L, D) text features, L cut to the longest caption
    mask: torch.Tensor  # (N, L) bool
    logvar: torch.Tensor | None = None  # (N, 12, T, H, W) posterior log-variances, when sampling the posterior
    captions: list[str] | None = None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def save(self, path: str | Path) -> None:
        """One safetensors file; the captions go in its metadata as JSON."""
        tensors = {"mean": self.mean, "features": self.features, "mask": self.mask}
        if self.logvar is not None:
            tensors["logvar"] = self.logvar
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"captions": json.dumps(self.captions or [])})

    @classmethod
    def load(cls, path: str | Path) -> LatentData:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            captions = json.loads(f.metadata().get("captions", "[]")) or None
        return cls(tensors["mean"], tensors["features"], tensors["mask"].bool(), tensors.get("logvar"), captions)


@torch.no_grad()
def encode_latent_data(
    encoder: torch.nn.Module,
    text_encoder,
    batches: Iterable[tuple[torch.Tensor, list[str]]],
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    keep_logvar: bool = False,
) -> LatentData:
    """Encode (videos (B, 3, T, H, W) uint8, captions) batches with the VAE encoder and T5 into a LatentData."""
    m, s = latent_mean.float()[:, None, None, None], latent_std.float()[:, None, None, None]  # (12, 1, 1, 1)
    means, logvars, feats, masks, captions = [], [], [], [], []
    for videos, texts in batches:
        mean, logvar = encoder(videos.float() / 127.5 - 1.0)  # (B, 12, T', H', W') each, VAE space
        means.append((mean.float() - m) / s)
        logvars.append(logvar.float() - 2 * s.log())  # the variance scales by 1 / std^2 too
        f, k = text_encoder.encode(list(texts))  # (B, 256, D), (B, 256)
        feats.append(f.float())
        masks.append(k)
        captions += list(texts)
    mask = torch.cat(masks)
    n_text = max(1, int(mask.sum(dim=1).max()))  # T5 pads on the right: keep only columns some caption uses
    return LatentData(
        torch.cat(means),
        torch.cat(feats)[:, :n_text].contiguous(),
        mask[:, :n_text].contiguous(),
        torch.cat(logvars) if keep_logvar else None,
        captions,
    )


@dataclass(frozen=True)
class DiTTrainConfig(TrainConfig):
    """DiT settings: the reference's objective (uniform sigma, 10% caption dropout), batch drawn from the cache."""

    batch_size: int = 32
    caption_dropout: float = 0.1
    sigma_sampler: str = "uniform"  # or "logit_normal"
    sigma_shift: float = 1.0  # > 1 draws more noisy levels (flow.shift_sigmas); 1 is the reference
    bf16_autocast: bool = True  # the forward under bf16 autocast when the model is on a GPU (as the reference)
    # Draw z0 ~ N(mean, exp(logvar)) like the reference; off by default because the demo VAE decodes the mean.
    sample_posterior: bool = False
    train_text_encoder: bool = True  # with a text encoder given to the trainer: train it, or only run it


class CaptionedDiT(nn.Module):
    """A DiT behind a trainable T5 encoder: (x, sigma, token ids, mask) -> velocity, trained as one model."""

    def __init__(self, dit: AsymmDiT, t5: nn.Module):
        super().__init__()
        self.dit, self.t5 = dit, t5

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        features = self.t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, text_dim)
        return self.dit(x, sigma, features, mask)  # (B, C, T, H, W)


class DiTTrainer(Trainer):
    """Flow-matching training of an AsymmDiT on a LatentData cache; with `text`, its T5 is trained along."""

    def __init__(
        self,
        model: AsymmDiT,
        data: LatentData,
        cfg: DiTTrainConfig = DiTTrainConfig(),
        text=None,
        recaption: Callable[[list[int], np.random.Generator], list[str]] | None = None,
    ):
        """`text`: a TextEncoder run on the captions at every step (trained along unless cfg.train_text_encoder is
        off) instead of the cached features; `recaption(indices, rng)`: fresh captions for the drawn clips at every
        step (with `text` only), so the model sees ever new phrasings of the same content rather than the cache's."""
        if recaption is not None and text is None:
            raise ValueError("recaption needs a text encoder to run on the new captions (text=...)")
        if cfg.sample_posterior and data.logvar is None:
            raise ValueError("sample_posterior needs LatentData with logvar (encode_latent_data(keep_logvar=True))")
        self.text, self.recaption = text, recaption
        if text is not None:
            if recaption is None:  # the cache's captions, tokenized once
                if not data.captions or len(data.captions) != len(data):
                    raise ValueError("running the text encoder needs the captions in the LatentData cache")
                self.ids, self.mask = self._tokens(data.captions)  # (N, L) each
            model = CaptionedDiT(model, text.model.requires_grad_(cfg.train_text_encoder))
        super().__init__(model, cfg)
        self.data = data

    def loss(self) -> tuple[torch.Tensor, dict]:
        cfg, g, data = self.cfg, self.generator, self.data
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        z0 = data.mean[idx].float()  # (B, 12, T, H, W)
        if cfg.sample_posterior:
            z0 = z0 + (0.5 * data.logvar[idx].float()).exp() * torch.randn(z0.shape, generator=g)
        if self.text is None:
            text, mask = drop_captions(data.features[idx].float(), data.mask[idx], cfg.caption_dropout, g)
        else:  # dropped captions: no tokens at all, as the empty prompt is encoded at sampling time
            if self.recaption is not None:
                ids, mask = self._tokens(self.recaption(idx.tolist(), self.rng))
            else:
                ids, mask = self.ids[idx], self.mask[idx]
            text, mask = drop_captions(ids, mask, cfg.caption_dropout, g)
        device = next(self.model.parameters()).device  # the draws above stay on the CPU generator
        with torch.autocast("cuda", torch.bfloat16, enabled=cfg.bf16_autocast and device.type == "cuda"):
            loss = flow_matching_loss(self.model, z0, text, mask, g, cfg.sigma_sampler, cfg.sigma_shift, device)
        return loss, {}

    def _tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, (N, L) each, cut to the longest caption (T5 pads on the right)."""
        ids, mask = self.text.tokenize(captions)  # (N, 256) each
        n = max(1, int(mask.sum(dim=1).max()))
        return ids[:, :n].contiguous(), mask[:, :n].contiguous()
