"""Parity with diffusers' AutoencoderKLMochi where both define the same function, through the real loading path:
diffusers writes its folder with save_pretrained, we load it with load_vae_decoder / load_vae_encoder."""

from __future__ import annotations

import pytest
import torch
from vae_fixtures import diffusers_vae, rel, save_diffusers_vae, single_thread  # noqa: F401 (autouse fixture)

from mochi_preview.vae import DecoderConfig, EncoderConfig, decode, load_vae_decoder, load_vae_encoder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    vae = diffusers_vae(seed=3)
    folder = save_diffusers_vae(tmp_path_factory.mktemp("diffusers"), vae)
    return vae, load_vae_decoder(folder), load_vae_encoder(folder)


def test_configs_from_a_diffusers_folder(pair):
    _, decoder, encoder = pair
    assert decoder.config == DecoderConfig(channels=(64, 32, 32, 32), num_res_blocks=(1, 1, 2, 1, 1))
    assert encoder.config == EncoderConfig(channels=(32, 32, 64, 64), num_res_blocks=(1, 1, 2, 1, 1))


@pytest.mark.parametrize("frames", [1, 7, 13])
def test_encoder_matches_diffusers_end_to_end(pair, frames):
    """diffusers adds the Fourier features inside its encoder, as ours does: plain video in, same mean/logvar."""
    vae, _, encoder = pair
    video = torch.rand(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        moments, _ = vae.encoder(video)
    mean, logvar = encoder(video)
    assert mean.shape == logvar.shape == (1, 12, (frames - 1) // 6 + 1, 2, 3)
    torch.testing.assert_close(mean, moments[:, :12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, moments[:, 12:], atol=1e-5, rtol=1e-5)


def _x(channels: int, frames: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, channels, frames, 5, 6, generator=torch.Generator().manual_seed(seed))


def test_group_norm_matches(pair):
    vae, decoder, _ = pair
    x = _x(32) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(decoder.blocks[0][1].stack[0](x), vae.decoder.block_in.resnets[0].norm1(x))


def test_causal_conv_matches(pair):
    vae, decoder, _ = pair
    x = _x(32)
    with torch.no_grad():
        theirs, _ = vae.decoder.block_in.resnets[0].conv1(x)
        torch.testing.assert_close(decoder.blocks[0][1].stack[2](x), theirs, atol=1e-5, rtol=1e-5)


def test_strided_causal_conv_matches(pair):
    """The encoder's downsampling convs: kernel = stride = (st, s, s), replicate front pad in time only."""
    vae, _, encoder = pair
    for b, down in enumerate(vae.encoder.down_blocks):
        x = torch.randn(1, down.conv_in.conv.in_channels, 7, 8, 8, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            theirs, _ = down.conv_in(x)
            ours = encoder.layers[2 + b].layers[0](x)  # layers.1 is level 0's single ResBlock
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_resblock_matches(pair):
    vae, decoder, _ = pair
    x = _x(32)
    with torch.no_grad():
        theirs, _ = vae.decoder.block_in.resnets[0](x)
        torch.testing.assert_close(decoder.blocks[0][1](x), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_upsampling_matches_before_the_frame_drop(pair, index):
    """Depth-to-space-time reshuffles alike; native then drops the first st - 1 frames, diffusers keeps them."""
    vae, decoder, _ = pair
    theirs_block = vae.decoder.up_blocks[index]
    x = _x(theirs_block.resnets[0].in_channels, frames=3)
    with torch.no_grad():
        theirs, _ = theirs_block(x)
        ours = decoder.blocks[1 + index](x)
    st = theirs_block.temporal_expansion
    assert theirs.shape[2] == 3 * st and ours.shape[2] == 3 * st - (st - 1)
    torch.testing.assert_close(ours, theirs[:, :, st - 1 :], atol=1e-5, rtol=1e-5)


def test_decoder_differs_from_diffusers_only_by_design(pair):
    """End to end the functions differ (frame dropping, spec 12): same shape, different early frames."""
    vae, decoder, _ = pair
    z = torch.randn(1, 12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = vae.decode(z).sample
    ours = decode(decoder, z, mode="full")
    assert ours.shape == theirs.shape == (1, 3, 13, 32, 32)
    assert rel(ours[:, :, :1], theirs[:, :, :1]) > 0.01
