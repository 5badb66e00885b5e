"""Pretraining a small T5 encoder to read captions: classify each caption's attributes from its mean feature.

A randomly initialised small T5 barely sees word order: "from left to right" and "from right to left" (the same
pieces, reordered) come out with features 4% apart, and a DiT trained on them moves objects either way. Teaching the
encoder to name the attributes of captions (colour, shape, direction ...) with one linear head each on its
masked-mean feature makes what the video depends on linearly readable in the features, word order included; the
encoder is then frozen for the DiT and the heads are dropped. The loop, EMA and exact-resume checkpoints are the
shared `Trainer`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5EncoderModel

from ..text import TextEncoder
from .common import TrainConfig, Trainer

# (rng, n) -> n captions and their labels (n, K) long, one column per attribute
CaptionSampler = Callable[[np.random.Generator, int], tuple[list[str], torch.Tensor]]


@dataclass(frozen=True)
class TextTrainConfig(TrainConfig):
    """Text-encoder settings: short and fast (the encoder is tiny), a strong start for the position bias."""

    steps: int = 600
    lr: float = 1e-3
    warmup: int = 50
    ema_decay: float = 0.99
    batch_size: int = 64
    # The relative-position bias is redrawn at this std before training (None keeps the model's): from T5's own
    # init (std ~0.09) 1,200 steps never learnt "from A to B"; from 1.5 about 200 steps do (bench_text_encoder.py).
    position_bias_std: float | None = 1.5


class CaptionClassifier(nn.Module):
    """A T5 encoder with one linear head per attribute on its masked-mean feature: (ids, mask) -> logits each."""

    def __init__(self, t5: T5EncoderModel, classes: Sequence[int], generator: torch.Generator):
        super().__init__()
        self.t5 = t5
        width = t5.config.d_model
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in classes)
        for head in self.heads:  # seeded here: nn.Linear's own init draws from the global RNG
            nn.init.normal_(head.weight, std=width**-0.5, generator=generator)
            nn.init.zeros_(head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        feats = self.t5(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        weights = mask[..., None].to(feats.dtype)  # (B, L, 1)
        pooled = (feats * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D) mean over the valid tokens
        return [head(pooled) for head in self.heads]  # K x (B, classes_k)


class TextTrainer(Trainer):
    """Trains `text`'s T5 (in place) to classify captions drawn by `sample`; `classes[k]`: labels of column k."""

    def __init__(self, text: TextEncoder, classes: Sequence[int], sample: CaptionSampler, cfg=TextTrainConfig()):
        t5 = text.model.requires_grad_(True)
        generator = torch.Generator().manual_seed(cfg.seed)
        if cfg.position_bias_std is not None:
            bias = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias  # the other blocks reuse it
            with torch.no_grad():
                bias.weight.normal_(0.0, cfg.position_bias_std, generator=generator)
        super().__init__(CaptionClassifier(t5, classes, generator), cfg)
        self.text, self.sample = text, sample

    def logits(self, model: CaptionClassifier, captions: list[str]) -> list[torch.Tensor]:
        ids, mask = self.text.tokenize(captions)  # (B, max_length): cut to the longest caption, the rest is padding
        length = int(mask.sum(1).max().clamp(min=1))
        return model(ids[:, :length], mask[:, :length])

    def loss(self) -> tuple[torch.Tensor, dict]:
        captions, labels = self.sample(self.rng, self.cfg.batch_size)  # labels (B, K)
        logits = self.logits(self.model, captions)
        losses = [F.cross_entropy(x, labels[:, k]) for k, x in enumerate(logits)]
        return sum(losses), {f"loss_{k}": x.item() for k, x in enumerate(losses)}

    @torch.no_grad()
    def accuracy(self, captions: list[str], labels: torch.Tensor, model: CaptionClassifier | None = None) -> list:
        """Share of `captions` whose attribute k is named right, per column (default model: the EMA weights)."""
        model = model or self.ema_model()
        logits = self.logits(model.eval(), captions)
        return [float((x.argmax(-1) == labels[:, k]).float().mean()) for k, x in enumerate(logits)]
