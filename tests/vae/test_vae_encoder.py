"""The encoder (Fourier features inside, causal in time), encode -> decode shapes, latent normalization."""

from __future__ import annotations

import math

import pytest
import torch
from vae_fixtures import randomize_, single_thread  # noqa: F401 (autouse fixture)

from mochi_preview.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    Decoder,
    DecoderConfig,
    Encoder,
    EncoderConfig,
    decode,
    denormalize_latents,
    fourier_features,
    normalize_latents,
)

SMALL = dict(channels=(32, 32, 32, 32), num_res_blocks=(1, 1, 1, 1, 1))


@pytest.fixture(scope="module")
def encoder():
    return randomize_(Encoder(EncoderConfig(**SMALL)), seed=11)


@pytest.fixture(scope="module")
def decoder():
    return randomize_(Decoder(DecoderConfig(**SMALL)), seed=12, scale=0.3)


def video(t: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fourier_features_layout_and_values():
    x = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1, 1)
    f = fourier_features(x.to(torch.bfloat16))
    assert f.shape == (1, 15, 1, 1, 1) and f.dtype == torch.float32  # fp32 whatever the input
    r, g, b = x.to(torch.bfloat16).float().flatten().tolist()
    w0, w1 = 128 * math.pi, 256 * math.pi
    expected = [r, g, b]
    expected += [math.sin(w * c) for c in (r, g, b) for w in (w0, w1)]
    expected += [math.cos(w * c) for c in (r, g, b) for w in (w0, w1)]
    torch.testing.assert_close(f.flatten(), torch.tensor(expected), atol=2e-5, rtol=0)


@pytest.mark.parametrize("frames", [1, 7, 13, 19])
def test_encode_decode_shapes(encoder, decoder, frames):
    mean, logvar = encoder(video(frames))
    k = (frames - 1) // 6 + 1
    assert mean.shape == logvar.shape == (1, 12, k, 2, 2)
    assert decode(decoder, mean, mode="full").shape == (1, 3, frames, 16, 16)


def test_encoder_is_causal(encoder):
    """Latent j depends only on frames up to 6j: changing later frames leaves earlier latents alone."""
    x = video(13)
    mean, _ = encoder(x)
    for j in (0, 1):
        changed = x.clone()
        changed[:, :, 6 * j + 1 :] = video(12 - 6 * j, seed=5)
        other, _ = encoder(changed)
        torch.testing.assert_close(other[:, :, : j + 1], mean[:, :, : j + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(other[:, :, j + 1 :], mean[:, :, j + 1 :])


def test_bf16_encoder_takes_fp32_video():
    encoder = randomize_(Encoder(EncoderConfig(**SMALL)), seed=11)
    reference, _ = encoder(video(1))
    mean, _ = encoder.to(torch.bfloat16)(video(1))
    assert mean.dtype == torch.bfloat16
    assert ((mean.float() - reference).norm() / reference.norm()) < 0.05


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 8, 16, 16), r"T=8 is not of the form 6k\+1 \(nearest valid: \[7, 13\]\)"),
        ((1, 3, 7, 20, 12), r"H=20 is not a multiple of 8 .*\[16, 24\]\); W=12 is not a multiple of 8 .*\[8, 16\]"),
        ((1, 4, 7, 16, 16), r"\(B, 3, T, H, W\)"),
        ((3, 7, 16, 16), r"\(B, 3, T, H, W\)"),
    ],
)
def test_bad_encoder_inputs_are_clear_errors(encoder, shape, message):
    with pytest.raises(ValueError, match=message):
        encoder(torch.zeros(shape))


def test_latent_normalization():
    z = torch.randn(2, 12, 3, 4, 5, dtype=torch.float64)
    dit = normalize_latents(z)
    mean = torch.tensor(LATENTS_MEAN).view(1, 12, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 12, 1, 1, 1)
    torch.testing.assert_close(dit, ((z - mean.double()) / std.double()).to(dit.dtype), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(denormalize_latents(dit), z, atol=1e-6, rtol=1e-6)
    assert normalize_latents(z.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\(B, 12, T, H, W\)"):
        normalize_latents(torch.zeros(1, 16, 1, 2, 2))
