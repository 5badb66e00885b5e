"""The VAE's edge term and the edge-sharpness figure of reconstructions (issue 15: crisp frames)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mochi_preview.demo import world as W
from mochi_preview.demo.build import reconstruction_scores
from mochi_preview.train import VAETrainConfig, VAETrainer, vae_losses
from mochi_preview.train.vae import edge_sharpness, gradient_magnitude

WORLD = W.WorldConfig(frames=7, height=32, width=32, size_range=(0.2, 0.3))


def clips(n: int = 2) -> torch.Tensor:
    return W.to_model_range(W.sample_batch(np.random.default_rng(0), n, config=WORLD)[0])


def box_blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 mean over each frame (edges replicated)."""
    b, c, t, h, w = x.shape
    frames = F.pad(x.transpose(1, 2).reshape(b * t, c, h, w), (1, 1, 1, 1), mode="replicate")
    return F.avg_pool2d(frames, 3, stride=1).reshape(b, t, c, h, w).transpose(1, 2)


def test_gradient_magnitude_of_a_step():
    x = torch.zeros(1, 3, 1, 4, 4)
    x[:, 1, :, :, 2:] = 0.5  # one channel steps by 0.5 between columns 1 and 2
    mag = gradient_magnitude(x)
    assert mag.shape == (1, 1, 3, 3)
    assert torch.equal(mag[0, 0], torch.tensor([[0.0, 0.5, 0.0]] * 3))


def test_edge_sharpness_is_one_for_the_clip_itself_and_lower_when_blurred():
    x = clips()
    assert edge_sharpness(x, x) == pytest.approx(1.0)
    once, twice = edge_sharpness(box_blur(x), x), edge_sharpness(box_blur(box_blur(x)), x)
    assert 0.3 < twice < once < 0.8
    assert edge_sharpness(torch.full_like(x, -0.8), x) == 0.0  # a flat frame has no outline at all


def test_edge_sharpness_needs_an_outline():
    with pytest.raises(ValueError, match="no outline"):
        edge_sharpness(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 8))


def test_the_edge_term_counts_blurred_outlines_not_a_uniform_offset():
    x = clips()
    mean = logvar = torch.zeros(2, 12, 2, 4, 4)
    assert vae_losses(x, x.clone(), mean, logvar, VAETrainConfig())["edge"] == 0
    blurred = vae_losses(x, box_blur(x), mean, logvar, VAETrainConfig())
    shifted = vae_losses(x, x + 0.1, mean, logvar, VAETrainConfig())  # a uniform offset keeps every edge
    assert blurred["edge"] > 0.01 and shifted["edge"] < 1e-6


class _Flat(torch.nn.Module):
    """A fake VAE half: a zero latent (encoder) or one learnt clip whatever the latent (decoder)."""

    def __init__(self, decoder: bool):
        super().__init__()
        self.decoder, self.clip = decoder, torch.nn.Parameter(torch.zeros(1, 3, 7, 32, 32))

    def forward(self, x):
        if self.decoder:
            return self.clip.expand(x.shape[0], -1, -1, -1, -1)
        z = torch.zeros(x.shape[0], 12, 2, 4, 4) + 0 * self.clip.sum()
        return z, z


def test_the_trainer_adds_the_edge_term_with_its_weight():
    sample = lambda rng, n: W.sample_batch(rng, n, config=WORLD)[0]
    losses = {}
    for weight in (0.0, 3.0):
        trainer = VAETrainer(_Flat(False), _Flat(True), sample, VAETrainConfig(batch_size=2, edge_weight=weight))
        losses[weight] = trainer.loss()
    (plain, logs), (weighted, _) = losses[0.0], losses[3.0]
    assert logs["edge"] > 0.01
    assert float((weighted - plain).detach()) == pytest.approx(3.0 * logs["edge"], rel=1e-5)


def test_reconstruction_scores_of_the_clips_themselves_and_of_a_blur():
    videos, _, attrs = W.sample_batch(np.random.default_rng(3), 6, split="all", config=WORLD)
    truth = W.to_model_range(videos)
    exact = reconstruction_scores(truth, videos, attrs)
    assert exact["shape"] == exact["colour"] == exact["one_object"] == exact["ghost_free"] == 1.0
    assert exact["edge"] == pytest.approx(1.0) and exact["psnr"] > 60
    blurred = reconstruction_scores(box_blur(box_blur(truth)), videos, attrs)
    assert blurred["edge"] < 0.6 and 20 < blurred["psnr"] < exact["psnr"]
