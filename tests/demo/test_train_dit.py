"""DiT training: the flow-matching objective, caption dropout, LR schedule, EMA, a short run, exact resume."""

import dataclasses
import math

import pytest
import torch

from mochi_preview.dit import AsymmDiT, DiTConfig, init_weights
from mochi_preview.train import (
    EMA,
    DiTTrainConfig,
    DiTTrainer,
    LatentData,
    TrainConfig,
    drop_captions,
    encode_latent_data,
    flow_matching_loss,
    lr_at,
    noisy_latents,
    sample_sigmas,
)

torch.set_num_threads(1)

TINY = DiTConfig(depth=2, num_heads=2, head_dim=32, dim_y=64, mlp_hidden_x=128, mlp_hidden_y=128, text_dim=32)


def _model(seed: int = 0) -> AsymmDiT:
    return init_weights(AsymmDiT(TINY), generator=torch.Generator().manual_seed(seed))


def _data(n: int = 4, seed: int = 0) -> LatentData:
    """n random latents (12, 2, 4, 4), each with its own random caption features of 3..6 tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(8)[None] < torch.randint(3, 7, (n, 1), generator=g)
    features = torch.randn(n, 8, TINY.text_dim, generator=g) * mask[..., None]
    latents, logvar = torch.randn(2, n, 12, 2, 4, 4, generator=g)
    return LatentData(latents, features, mask, logvar - 3)


def test_sigma_samplers():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal"):
        s = sample_sigmas(20000, g, kind)
        assert s.shape == (20000,) and s.min() > 0 and s.max() < 1 and abs(float(s.mean()) - 0.5) < 0.01
    uniform, logit = sample_sigmas(20000, g), sample_sigmas(20000, g, "logit_normal")
    assert ((logit - 0.5).abs() < 0.25).float().mean() > ((uniform - 0.5).abs() < 0.25).float().mean() + 0.1
    with pytest.raises(ValueError):
        sample_sigmas(3, g, "cosine")


def test_interpolant_and_velocity_target():
    z0, noise = torch.randn(3, 12, 2, 4, 4), torch.randn(3, 12, 2, 4, 4)
    sigma = torch.tensor([0.0, 1.0, 0.25])
    z = noisy_latents(z0, noise, sigma)
    assert torch.equal(z[0], z0[0]) and torch.equal(z[1], noise[1])
    torch.testing.assert_close(z[2], 0.75 * z0[2] + 0.25 * noise[2])
    # A model that always answers 0 pays exactly the mean square of the target z0 - noise, with the noise and
    # sigmas the generator gives (sigma first, then the noise).
    seen = {}

    def zero_model(z, s, features, mask):
        seen.update(z=z, s=s)
        return torch.zeros_like(z)

    z0 = torch.randn(5, 12, 2, 4, 4)
    loss = flow_matching_loss(
        zero_model, z0, torch.zeros(5, 3, 32), torch.ones(5, 3, dtype=torch.bool), torch.Generator().manual_seed(1)
    )
    g = torch.Generator().manual_seed(1)
    sigma, noise = torch.rand(5, generator=g), torch.randn(z0.shape, generator=g)
    torch.testing.assert_close(seen["s"], sigma)
    torch.testing.assert_close(seen["z"], noisy_latents(z0, noise, sigma))
    torch.testing.assert_close(loss, ((z0 - noise) ** 2).mean())


def test_caption_dropout_rate_and_effect():
    g = torch.Generator().manual_seed(0)
    features, mask = torch.randn(20000, 4, 8) + 5, torch.ones(20000, 4, dtype=torch.bool)
    dropped_f, dropped_m = drop_captions(features, mask, 0.1, g)
    gone = ~dropped_m.any(dim=1)
    assert abs(float(gone.float().mean()) - 0.1) < 0.01
    assert (dropped_f[gone] == 0).all() and torch.equal(dropped_f[~gone], features[~gone])
    assert dropped_m[~gone].all()
    assert drop_captions(features, mask, 0.0, g)[1].all()


def test_lr_schedule_warmup_peak_and_end():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-5)  # the first update already moves
    assert lr_at(49, cfg) == pytest.approx(5e-4)
    assert lr_at(99, cfg) == pytest.approx(1e-3) and lr_at(100, cfg) == pytest.approx(1e-3)  # peak
    assert lr_at(550, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    assert lr_at(1000, cfg) == pytest.approx(1e-4) and lr_at(5000, cfg) == pytest.approx(1e-4)  # floor
    lrs = [lr_at(s, cfg) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_follows_its_definition():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    expected = {k: v.clone() for k, v in start.items()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k])
    copy = ema.copy_to(torch.nn.Linear(3, 2))
    torch.testing.assert_close(copy.weight, expected["weight"])


def test_short_run_lowers_the_loss():
    cfg = DiTTrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, threads=1, seed=0)
    data = _data(4)
    data.mean *= 2  # latents well away from the noise: the part a few steps can learn dominates the loss
    trainer = DiTTrainer(_model(), data, cfg)
    logs = trainer.fit(progress=False)
    first = sum(x["loss"] for x in logs[:8]) / 8
    last = sum(x["loss"] for x in logs[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    assert all(math.isfinite(x["grad_norm"]) for x in logs)
    ema = trainer.ema_model()
    assert not ema.training and all(torch.equal(ema.state_dict()[k], v) for k, v in trainer.ema.shadow.items())


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_resume_gives_exactly_the_same_state(tmp_path, sample_posterior):
    cfg = DiTTrainConfig(
        steps=6,
        batch_size=4,
        lr=1e-3,
        warmup=2,
        threads=1,
        seed=3,
        checkpoint_every=100,
        sample_posterior=sample_posterior,
    )
    straight = DiTTrainer(_model(), _data(), cfg)
    straight.fit(progress=False)

    first = DiTTrainer(_model(), _data(), cfg)
    first.fit(until=3, checkpoint=tmp_path / "ckpt", progress=False)  # saves at the end
    assert (tmp_path / "ckpt" / "state.json").exists() and first.step == 3
    resumed = DiTTrainer(_model(seed=99), _data(), cfg)  # other init: everything must come from the checkpoint
    resumed.fit(checkpoint=tmp_path / "ckpt", progress=False)  # loads step 3, trains to 6

    a, b = straight.state(), resumed.state()
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1]  # step, EMA count, optimizer groups, RNG state, loss history
    longer = DiTTrainer(_model(), _data(), dataclasses.replace(cfg, steps=10))
    with pytest.warns(UserWarning, match="steps"):
        longer.load(tmp_path / "ckpt")
    assert longer.step == 6


def test_sample_posterior_needs_logvar():
    data = _data()
    data.logvar = None
    with pytest.raises(ValueError, match="logvar"):
        DiTTrainer(_model(), data, DiTTrainConfig(sample_posterior=True, threads=1))


class _FakeEncoder(torch.nn.Module):
    """Mean = 2 * the frame's mean colour per latent 'pixel', logvar = -1 everywhere."""

    def forward(self, video):  # (B, 3, T, H, W) in [-1, 1]
        x = torch.nn.functional.avg_pool3d(video.mean(1, keepdim=True), (6, 8, 8), ceil_mode=True)
        mean = 2 * x.expand(-1, 12, -1, -1, -1)
        return mean, torch.full_like(mean, -1.0)


class _FakeText:
    """Encodes a caption as its word count of ones, right-padded to 16 tokens like T5."""

    def encode(self, captions):
        mask = torch.arange(16)[None] < torch.tensor([len(c.split()) for c in captions])[:, None]
        return torch.ones(len(captions), 16, 32) * mask[..., None], mask


def test_latent_data_encoding_normalizes_trims_and_round_trips(tmp_path):
    videos = torch.full((3, 3, 7, 16, 16), 255, dtype=torch.uint8)
    captions = [["a red ball", "one blue box moves up"], ["a b c d"]]
    batches = [(videos[:2], captions[0]), (videos[2:], captions[1])]
    mean, std = torch.full((12,), 0.5), torch.full((12,), 2.0)
    data = encode_latent_data(_FakeEncoder(), _FakeText(), batches, mean, std, keep_logvar=True)
    assert data.mean.shape == (3, 12, 2, 2, 2) and len(data) == 3
    torch.testing.assert_close(data.mean, torch.full_like(data.mean, (2.0 - 0.5) / 2.0))
    torch.testing.assert_close(data.logvar, torch.full_like(data.logvar, -1.0 - 2 * math.log(2.0)))
    assert data.features.shape == (3, 5, 32) and data.mask.sum(1).tolist() == [3, 5, 4]  # cut to 5 tokens
    data.save(tmp_path / "cache.safetensors")
    back = LatentData.load(tmp_path / "cache.safetensors")
    assert back.captions == captions[0] + captions[1]
    for name in ("mean", "features", "mask", "logvar"):
        assert torch.equal(getattr(back, name), getattr(data, name))
    no_logvar = encode_latent_data(_FakeEncoder(), _FakeText(), batches, mean, std)
    assert no_logvar.logvar is None


def _captioned_data(n: int = 4) -> LatentData:
    data = _data(n)
    data.captions = ["a red ball moves left", "a blue box moves from right to left", "up", "the green disc"][:n]
    return data


def _text(tmp_path):
    from mochi_preview.text import TextEncoder
    from mochi_preview.tiny import save_tiny_t5

    save_tiny_t5(tmp_path / "t5", d_model=TINY.text_dim, seed=0)
    return TextEncoder.from_folder(tmp_path / "t5")


def test_text_encoder_trains_with_the_dit_and_resumes(tmp_path):
    cfg = DiTTrainConfig(steps=6, batch_size=4, lr=1e-3, warmup=2, threads=1, seed=3, checkpoint_every=100)
    text = _text(tmp_path)
    before = {k: v.clone() for k, v in text.model.state_dict().items()}
    straight = DiTTrainer(_model(), _captioned_data(), cfg, text=text)
    assert straight.ids.shape[1] == straight.mask.sum(1).max()  # cut to the longest caption (with EOS)
    straight.fit(progress=False)
    t5 = straight.ema_model().t5
    assert any(not torch.equal(before[k], v) for k, v in t5.state_dict().items())  # the T5 itself learned

    first = DiTTrainer(_model(), _captioned_data(), cfg, text=_text(tmp_path / "a"))
    first.fit(until=3, checkpoint=tmp_path / "ckpt", progress=False)  # tied embeddings saved under both names
    resumed = DiTTrainer(_model(seed=99), _captioned_data(), cfg, text=_text(tmp_path / "b"))
    resumed.fit(checkpoint=tmp_path / "ckpt", progress=False)
    a, b = straight.state(), resumed.state()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


def test_dropped_captions_reach_the_dit_as_no_text(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.ones(64, 5, dtype=torch.long), torch.ones(64, 5, dtype=torch.bool)
    dropped_ids, dropped_mask = drop_captions(ids, mask, 0.5, g)
    gone = ~dropped_mask.any(1)
    assert 10 < int(gone.sum()) < 54 and (dropped_ids[gone] == 0).all() and (dropped_ids[~gone] == 1).all()


def test_training_the_text_encoder_needs_captions(tmp_path):
    with pytest.raises(ValueError, match="captions"):
        DiTTrainer(_model(), _data(), DiTTrainConfig(threads=1), text=_text(tmp_path))


def test_fresh_captions_every_step_and_exact_resume(tmp_path):
    cfg = DiTTrainConfig(steps=4, batch_size=3, lr=1e-3, warmup=1, threads=1, seed=5, checkpoint_every=100)
    words = ["left", "right", "up", "down"]
    seen = []

    def recaption(indices, rng):
        captions = [f"clip {i} moves {words[rng.integers(4)]}" for i in indices]
        seen.append(captions)
        return captions

    straight = DiTTrainer(_model(), _captioned_data(), cfg, text=_text(tmp_path), recaption=recaption)
    straight.fit(progress=False)
    assert len(seen) == 4 and len({c for batch in seen for c in batch}) > 4  # new phrasings, not the cache's
    first = DiTTrainer(_model(), _captioned_data(), cfg, text=_text(tmp_path / "a"), recaption=recaption)
    first.fit(until=2, checkpoint=tmp_path / "ckpt", progress=False)
    resumed = DiTTrainer(_model(seed=9), _captioned_data(), cfg, text=_text(tmp_path / "b"), recaption=recaption)
    resumed.fit(checkpoint=tmp_path / "ckpt", progress=False)  # the numpy caption stream resumes too
    a, b = straight.state(), resumed.state()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    with pytest.raises(ValueError, match="text encoder"):
        DiTTrainer(_model(), _captioned_data(), cfg, recaption=recaption)


def test_frozen_text_encoder_runs_on_fresh_captions_but_stays_put(tmp_path):
    cfg = DiTTrainConfig(steps=3, batch_size=2, lr=1e-3, warmup=1, threads=1, train_text_encoder=False)
    text = _text(tmp_path)
    before = {k: v.clone() for k, v in text.model.state_dict().items()}
    trainer = DiTTrainer(
        _model(), _captioned_data(), cfg, text=text, recaption=lambda idx, rng: ["a red ball"] * len(idx)
    )
    trainer.fit(progress=False)
    assert all(torch.equal(before[k], v) for k, v in trainer.model.t5.state_dict().items())
    assert trainer.history[-1]["loss"] > 0 and not any(p.requires_grad for p in trainer.model.t5.parameters())
