"""Image-to-video, video-to-video and extension building blocks (conditioning.py), on the shipped demo VAE."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from einops import rearrange

from mochi_preview import conditioning as cond
from mochi_preview.demo import world
from mochi_preview.sampling import TextCondition, denoise, linear_quadratic_schedule
from mochi_preview.vae import load_vae_encoder

DEMO = Path(__file__).parents[1] / "src" / "mochi_preview" / "assets" / "demo"


@pytest.fixture(scope="module")
def encoder():
    return load_vae_encoder(DEMO)


@pytest.fixture(scope="module")
def stats():
    s = json.loads((DEMO / "latent_stats.json").read_text())
    return s["mean"], s["std"]


def demo_clip(seed: int = 0, frames: int = 13) -> np.ndarray:
    rng = np.random.default_rng(seed)
    attrs = [world.Attributes("red", "square", "right")]
    config = world.WorldConfig(frames=frames)
    video = world.render(attrs, world.sample_geometry(rng, attrs, config), config)  # (1, 3, T, H, W) uint8
    return video[0].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3) uint8


def test_the_encoder_is_causal_so_an_image_is_latent_frame_zero(encoder, stats):
    clip = demo_clip()
    whole = cond.encode(encoder, clip, stats)  # (1, 12, 3, 8, 8)
    first = cond.encode(encoder, clip[:1], stats)  # (1, 12, 1, 8, 8)
    assert first.shape[2] == 1 and whole.shape[2] == 3
    torch.testing.assert_close(first[:, :, 0], whole[:, :, 0], rtol=1e-4, atol=1e-4)
    # ... and frame 1's latent does depend on the frames it encodes
    other = cond.encode(encoder, np.concatenate([clip[:1], clip[1:][::-1]]), stats)
    assert (other[:, :, 1] - whole[:, :, 1]).abs().max() > 1e-2


def test_fit_image_resizes_crops_and_says_so():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255  # a white centre band: after a centre crop to square, all white
    out, note = cond.fit_image(wide, 64, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.mean() > 250
    assert "80x40" in note and "centre-cropped" in note
    same, note = cond.fit_image(np.full((64, 64, 3), 7, np.uint8), 64, 64)
    assert note is None and (same == 7).all()


def test_bad_images_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"too small.*at least 212x120"):
        cond.fit_image(np.zeros((10, 10, 3), np.uint8), 480, 848)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cond.fit_image(tmp_path / "missing.png", 64, 64)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        cond.fit_image(tmp_path / "broken.png", 64, 64)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        cond.fit_image(np.zeros((64, 64)), 64, 64)


def test_fit_video_trims_to_6k_plus_1_and_refuses_what_does_not_fit():
    frames = np.zeros((30, 64, 64, 3), np.uint8)
    used, note = cond.fit_video(frames)
    assert len(used) == 25 and "first 25" in note
    assert cond.fit_video(frames[:25])[1] is None
    with pytest.raises(ValueError, match="at least 7"):
        cond.fit_video(frames[:6])
    with pytest.raises(ValueError, match="64x64 but 32x32"):
        cond.fit_video(frames, 32, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        cond.fit_video(np.zeros((7, 40, 64, 3), np.uint8))


def test_cut_schedule_starts_at_strength_with_the_steps_asked_for():
    full = linear_quadratic_schedule(64)
    assert cond.cut_schedule(1.0, 64) == full
    for strength, steps in [(0.3, 8), (0.6, 24), (0.95, 64), (0.05, 10)]:
        s = cond.cut_schedule(strength, steps)
        assert len(s) == steps + 1 and s[0] == strength and s[-1] == 0.0
        assert all(a > b for a, b in zip(s, s[1:]))
    # the tail keeps the quadratic part's shape: its steps grow toward sigma = 0
    s = cond.cut_schedule(0.5, 16)
    gaps = [a - b for a, b in zip(s[1:], s[2:])]
    assert all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            cond.cut_schedule(bad, 8)


def toy_velocity(z, sigma, features, mask):
    """A stand-in model: pushes every latent toward a fixed pattern (its own idea of the video)."""
    return torch.full_like(z, 2.0) - z


def run(conditioning: cond.Conditioning, sigmas, hook=None):
    text = TextCondition(torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.bool))
    return denoise(
        toy_velocity, conditioning.latents, conditioning.sigmas or sigmas, text,
        guidance=1.0, callback=conditioning.after_step, dit_hook=conditioning.dit_hook,
    )  # fmt: skip


@pytest.mark.parametrize("mode", cond.MODES)
def test_anchored_frames_end_on_the_image_and_the_rest_is_free(mode):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 12, 4, 4, 4, generator=g)
    x = torch.randn(1, 12, 1, 4, 4, generator=g)
    sigmas = linear_quadratic_schedule(12)
    out = run(cond.anchor(noise, x, sigmas, mode=mode), sigmas)
    torch.testing.assert_close(out[:, :, :1], x, rtol=0, atol=1e-5)
    free = run(cond.Conditioning(noise), sigmas)
    torch.testing.assert_close(out[:, :, 1:], free[:, :, 1:])  # the toy model does not mix frames
    assert (free[:, :, :1] - x).abs().max() > 0.5  # ... so without the anchor, frame 0 would be elsewhere


def test_replace_follows_the_images_own_noising_path():
    g = torch.Generator().manual_seed(1)
    noise, x = torch.randn(1, 12, 3, 2, 2, generator=g), torch.randn(1, 12, 1, 2, 2, generator=g)
    sigmas = linear_quadratic_schedule(6)
    c = cond.anchor(noise, x, sigmas)
    seen = []
    text = TextCondition(torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))

    def model(z, sigma, features, mask):
        seen.append((float(sigma[0]), z[:, :, :1].clone()))
        return toy_velocity(z, sigma, features, mask)

    denoise(model, c.latents, sigmas, text, guidance=1.0, callback=c.after_step)
    for sigma, z0 in seen:
        torch.testing.assert_close(z0, sigma * noise[:, :, :1] + (1 - sigma) * x)


def test_release_leaves_the_last_steps_free():
    g = torch.Generator().manual_seed(2)
    noise, x = torch.randn(1, 12, 2, 2, 2, generator=g), torch.randn(1, 12, 1, 2, 2, generator=g)
    sigmas = linear_quadratic_schedule(10)
    c = cond.anchor(noise, x, sigmas, release=0.3)
    assert c.record["anchored_steps"] == 7
    out = run(c, sigmas)
    assert (out[:, :, :1] - x).abs().max() > 1e-3  # the model moved it after the release
    with pytest.raises(ValueError, match="release"):
        cond.anchor(noise, x, sigmas, release=1.0)
    with pytest.raises(ValueError, match="mode"):
        cond.anchor(noise, x, sigmas, mode="soft")
    with pytest.raises(ValueError, match="do not fit"):
        cond.anchor(noise, torch.zeros(1, 12, 1, 3, 3), sigmas)


def test_video_to_video_starts_on_the_inputs_noising_path():
    g = torch.Generator().manual_seed(3)
    noise, x = torch.randn(1, 12, 3, 2, 2, generator=g), torch.randn(1, 12, 3, 2, 2, generator=g)
    sigmas = cond.cut_schedule(0.4, 5)
    c = cond.start_from(noise, x, 0.4, sigmas)
    torch.testing.assert_close(c.latents, 0.4 * noise + 0.6 * x)
    assert c.sigmas == sigmas and c.record["sigma0"] == 0.4
    with pytest.raises(ValueError, match="do not fit"):
        cond.start_from(noise, x[:, :, :2], 0.4, sigmas)


def test_extension_takes_the_last_frames_the_anchor_needs():
    frames = np.arange(20)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    tail = cond.extension_frames(frames, latent_frames=2)
    assert len(tail) == 7 and tail[0, 0, 0, 0] == 13 and tail[-1, 0, 0, 0] == 19
    with pytest.raises(ValueError, match="needs at least 13"):
        cond.extension_frames(frames[:10], latent_frames=3)


# ---- tiled encode ----------------------------------------------------------------------------------------------


class PatchEncoder(torch.nn.Module):
    """A stand-in encoder whose latent pixel depends on its own 8x8 pixels only (and latent frame k on frame 6k):
    tiling it changes nothing, so the tiled encode must give the untiled latents (up to the blend's rounding)."""

    config = SimpleNamespace(spatial_factor=8)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(12, 3 * 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, video):
        patches = rearrange(video[:, :, ::6], "b c t (h p) (w q) -> b t h w (c p q)", p=8, q=8)
        mean = torch.einsum("bthwk,ok->bothw", patches, self.weight)
        return mean, torch.zeros_like(mean)


def test_tiled_encode_puts_every_tile_in_its_place():
    frames = np.random.default_rng(0).integers(0, 256, (13, 48, 64, 3), dtype=np.uint8)
    encoder = PatchEncoder()
    whole = cond.encode(encoder, frames)
    assert whole.shape == (1, 12, 3, 6, 8)
    for tiles in ((1, 2), (2, 2), (2, 3)):
        tiled = cond.encode(encoder, frames, tiles=tiles, overlap=2)
        torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-5)  # blend weights w and 1 - w: fp32 rounding
    shifted = cond.encode(encoder, np.roll(frames, 8, axis=2), tiles=(2, 2), overlap=2)
    assert (shifted - whole).abs().max() > 1.0  # ... and the comparison sees a misplaced column
    with pytest.raises(ValueError, match="do not fit a height of 6"):
        cond.encode(encoder, frames, tiles=(4, 1), overlap=2)


def test_tiled_encode_of_the_demo_vae_reconstructs_the_video_as_well_as_the_untiled_one(encoder, stats):
    # A real encoder is not tile-local: each tile's GroupNorms see only its own pixels and its edge latents miss the
    # context beyond the tile, so the latents change (by up to a third of their range here, 64-pixel frames in
    # 40-pixel tiles). What must hold is what the latents are for: decoded, they show the video as well as the
    # untiled latents do (PSNR within 1 dB; measured: 23.7 dB untiled, 23.7 and 23.4 dB in 1x2 and 2x2 tiles).
    from mochi_preview.vae import decode, denormalize_latents, load_vae_decoder

    decoder = load_vae_decoder(DEMO)
    clip = demo_clip(seed=3, frames=7)

    def psnr(z):
        video = decode(decoder, denormalize_latents(z, *stats), mode="full")[0]
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
        return 10 * np.log10(255.0**2 / np.mean((frames - clip.astype(np.float64)) ** 2))

    whole = cond.encode(encoder, clip, stats)
    for tiles in ((1, 2), (2, 2)):
        tiled = cond.encode(encoder, clip, stats, tiles, overlap=2)
        assert (tiled - whole).abs().max() > 1e-3  # the tiles did run on their own
        assert psnr(tiled) > psnr(whole) - 1.0, tiles


def test_the_encode_plan_follows_the_vae_options_and_the_memory_budget(encoder):
    config, shape = encoder.config, (13, 64, 64)
    whole = cond.encode_bytes(config, *shape)
    assert cond.encode_plan(config, shape, {"mode": "full"}, budget=1) == ((1, 1), cond.ENCODE_OVERLAP)
    assert cond.encode_plan(config, shape, {"mode": "tiled", "tiles": (1, 2), "overlap": 1}, 1) == ((1, 2), 1)
    assert cond.encode_plan(config, shape, {"mode": "auto"}, budget=whole)[0] == (1, 1)
    assert cond.encode_plan(config, shape, {"mode": "tiled"}, budget=whole - 1)[0] == (2, 2)  # 40-pixel tiles
    assert cond.encode_bytes(config, 13, 40, 40) <= whole * 0.4
    assert cond.encode_plan(config, shape, {"mode": "auto"}, budget=0)[0] == (3, 3)  # the finest grid that fits
    with pytest.raises(ValueError, match=r"enable_vae_tiling\(tiles=\(4, 4\), overlap=2\) does not fit the 64x64"):
        cond.encode_plan(config, shape, {"mode": "tiled", "tiles": (4, 4)}, budget=whole)
