"""VAE training: loss terms, a short run that lowers the reconstruction error, latent statistics, exact resume, the
temporal inflation of a single-frame decoder."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mochi_preview.demo import world as W
from mochi_preview.train import (
    VAETrainConfig,
    VAETrainer,
    inflate_time,
    latent_stats,
    object_mask,
    reconstruct,
    vae_losses,
)
from mochi_preview.vae.model import Decoder, DecoderConfig, Encoder, EncoderConfig

torch.set_num_threads(1)

WORLD = W.WorldConfig(frames=7, height=32, width=32, size_range=(0.08, 0.14))  # latent (12, 2, 4, 4)
LEVELS = dict(channels=(32, 32, 32, 32), num_res_blocks=(0, 0, 0, 1, 1))  # no full-resolution blocks: fast


def _vae(seed: int = 0) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    return Encoder(EncoderConfig(has_attention=(False,) * 5, **LEVELS)), Decoder(DecoderConfig(**LEVELS))


def _videos(rng: np.random.Generator, n: int) -> torch.Tensor:
    return W.sample_batch(rng, n, split="all", config=WORLD)[0]


def test_object_mask_finds_the_rendered_object():
    attrs = [W.Attributes("purple", "square", "right"), W.Attributes("white", "triangle", "up")]
    geometry = W.sample_geometry(np.random.default_rng(0), attrs, WORLD)
    hard = W.WorldConfig(frames=7, height=32, width=32, antialias=False)
    x = W.to_model_range(W.render(attrs, geometry, hard))
    truth = (x != x[0, :, 0, 0, 0][None, :, None, None, None]).any(dim=1, keepdim=True).float()
    assert torch.equal(object_mask(x), truth)


def test_loss_terms():
    cfg = VAETrainConfig()
    x = W.to_model_range(_videos(np.random.default_rng(1), 2))
    mean, logvar = torch.zeros(2, 12, 2, 4, 4), torch.zeros(2, 12, 2, 4, 4)
    same = vae_losses(x, x.clone(), mean, logvar, cfg)
    assert same["recon"] == 0 and same["colour"] == 0 and same["kl"] == 0 and same["mse"] == 0
    obj = object_mask(x)
    recoloured = x + 0.2 * obj * torch.tensor([1.0, -1.0, 0.0])[None, :, None, None, None]  # only the object
    shifted = vae_losses(x, recoloured, mean + 1, logvar, cfg)
    assert shifted["colour"] == pytest.approx(0.2**2 * 2 / 3, rel=1e-4)
    assert shifted["kl"] == pytest.approx(0.5)
    # The object's pixels weigh 1 + object_weight times as much as the background's.
    plain = vae_losses(x, recoloured, mean, logvar, VAETrainConfig(object_weight=0.0))
    assert shifted["recon"] > 2 * plain["recon"]


def test_short_run_lowers_reconstruction_error():
    encoder, decoder = _vae()
    cfg = VAETrainConfig(steps=30, batch_size=4, lr=2e-3, warmup=5, threads=1, seed=0)
    logs = VAETrainer(encoder, decoder, _videos, cfg).fit(progress=False)
    first = np.mean([x["mse"] for x in logs[:5]])
    last = np.mean([x["mse"] for x in logs[-5:]])
    assert last < 0.5 * first, (first, last)
    assert logs[-1]["psnr"] > logs[0]["psnr"] + 3
    out = reconstruct(encoder, decoder, _videos(np.random.default_rng(9), 2))
    assert out.shape == (2, 3, 7, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_resume_gives_exactly_the_same_state(tmp_path):
    cfg = VAETrainConfig(steps=4, batch_size=2, warmup=1, threads=1, seed=5, sample_posterior=True)
    straight = VAETrainer(*_vae(), _videos, cfg)
    straight.fit(progress=False)
    VAETrainer(*_vae(), _videos, cfg).fit(until=2, checkpoint=tmp_path / "ckpt", progress=False)
    resumed = VAETrainer(*_vae(seed=1), _videos, cfg)
    resumed.fit(checkpoint=tmp_path / "ckpt", progress=False)  # clips drawn by the restored numpy generator
    (a, meta_a), (b, meta_b) = straight.state(), resumed.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a == meta_b


def test_a_frozen_encoder_stays_as_it_was_and_only_the_decoder_is_trained_and_checkpointed(tmp_path):
    encoder, decoder = _vae()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    cfg = VAETrainConfig(steps=3, batch_size=2, warmup=1, threads=1, train_encoder=False, latent_noise=0.5)
    trainer = VAETrainer(encoder, decoder, _videos, cfg)
    trainer.fit(checkpoint=tmp_path / "ckpt", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in decoder.state_dict().items())
    saved = load_file(tmp_path / "ckpt" / "state.safetensors")
    assert not any(k.startswith("model.encoder.") for k in saved) and any(k.startswith("model.decoder.") for k in saved)


def test_latent_noise_reaches_the_decoder_and_zero_adds_none():
    """The decoder's input is the posterior mean plus noise up to `latent_noise` channel stds; 0 is the plain mean."""
    seen = []
    encoder, decoder = _vae()
    decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    means = []
    encoder.register_forward_hook(lambda module, inputs, out: means.append(out[0].detach().clone()))
    for noise in (0.0, 1.0):
        cfg = VAETrainConfig(steps=1, batch_size=4, threads=1, train_encoder=False, latent_noise=noise)
        VAETrainer(encoder, decoder, _videos, cfg).loss()
    assert torch.equal(seen[0], means[0])
    offset = seen[1] - means[1]  # (B, 12, T, H, W): at most 1 std of each channel, a different level per clip
    levels = (offset / means[1].std(dim=(0, 2, 3, 4), keepdim=True)).flatten(1).std(dim=1)  # (B,)
    assert 0 < levels.min() < levels.max() < 1.2, levels


class _Affine(torch.nn.Module):
    """A fake encoder: latent channel c = video channel (c % 3) * (c + 1) + c, so stats are known in closed form."""

    def forward(self, video):  # (B, 3, T, H, W)
        c = torch.arange(12, dtype=torch.float32)[None, :, None, None, None]
        mean = video[:, torch.arange(12) % 3] * (c + 1) + c
        return mean, torch.zeros_like(mean)


def test_latent_stats_are_per_channel_mean_and_std():
    rng = np.random.default_rng(2)
    batches = [_videos(rng, 3) for _ in range(3)]
    mean, std = latent_stats(_Affine(), batches)
    x = W.to_model_range(torch.cat(batches)).double()  # (9, 3, T, H, W)
    for c in range(12):
        channel = x[:, c % 3] * (c + 1) + c
        assert mean[c].item() == pytest.approx(channel.mean().item(), rel=1e-5)
        assert std[c].item() == pytest.approx(channel.std(unbiased=False).item(), rel=1e-5)


@torch.no_grad()
def test_inflated_decoder_decodes_a_still_clip_as_its_first_frame_in_every_frame():
    encoder, decoder = _vae(3)
    frame = W.to_model_range(_videos(np.random.default_rng(4), 1))[:, :, :1]  # (1, 3, 1, 32, 32)
    still = frame.expand(-1, -1, 13, -1, -1).contiguous()
    one = decoder(encoder(frame)[0])  # (1, 3, 1, 32, 32): only the last sub-frame of each expansion is used
    before = decoder(encoder(still)[0])
    assert (before - one).abs().amax() > 0.05  # the earlier sub-frames are untrained: the still clip flickers
    inflate_time(decoder)
    after = decoder(encoder(still)[0])
    assert torch.equal(decoder(encoder(frame)[0]), one)  # a single frame decodes as before
    torch.testing.assert_close(after, one.expand_as(after), rtol=0, atol=1e-5)  # fp32 sums in another order
