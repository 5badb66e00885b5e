"""Previews: the latent -> RGB projection (fitted per decoder), the predicted clean latents, the preview image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mochi_preview import MochiPipeline, preview
from mochi_preview.tiny import demo_model_dir, save_random_model
from mochi_preview.vae import denormalize_latents


@pytest.fixture(scope="module")
def demo():
    folder = demo_model_dir()
    assert folder is not None, "the shipped demo model is missing"
    return MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


def linear_decoder(weight: torch.Tensor, bias: torch.Tensor):
    """A stand-in decoder whose every latent pixel decodes to exactly weight @ z + bias, over its 6x8x8 block."""

    def decode(z):
        rgb = torch.einsum("oc,bcthw->bthwo", weight, z) + bias  # (B, T, H, W, 3)
        rgb = rgb.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return torch.cat([rgb[:, :1], rgb[:, 1:].repeat_interleave(6, dim=1)], dim=1)  # 6T - 5 frames

    return decode


def test_block_means_follow_the_causal_vae_geometry():
    frames = torch.zeros(1, 13, 16, 24, 3)
    frames[0, 0] = 0.5  # latent frame 0 <- video frame 0 alone
    frames[0, 1:7, :8, 8:16, 1] = 1.0  # latent frame 1 <- frames 1..6; latent pixel (0, 1) <- that 8x8 block
    frames[0, 12, 8:, :8, 2] = 0.6  # latent frame 2 <- frames 7..12: one frame of six
    means = preview.block_means(frames)
    assert means.shape == (1, 3, 3, 2, 3)
    assert torch.equal(means[0, :, 0], torch.full((3, 2, 3), 0.5))
    assert means[0, 1, 1, 0, 1] == 1.0 and means[0, 1, 1].sum() == 1.0 and means[0, [0, 2], 1].sum() == 0
    assert means[0, 2, 2, 1, 0] == pytest.approx(0.1) and means[0, :, 2].sum() == pytest.approx(0.1)


def test_the_fit_recovers_an_affine_decoder_exactly():
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(3, 12, generator=g) / 10, torch.rand(3, generator=g)
    latents = torch.randn(2, 12, 2, 4, 8, generator=g)
    fit = preview.fit_projection(linear_decoder(weight, bias), latents)
    assert torch.allclose(fit.weight, weight, atol=1e-5) and torch.allclose(fit.bias, bias, atol=1e-5)


def test_demo_decoder_fit_carries_the_latents_colour_information(demo):
    """Held-out latents (another seed): the fitted projection's mean colour error is a fraction of the same map's with
    its latent channels shuffled. Measured (fitted / best constant colour / shuffled): 0.054 / 0.045 / 0.131 on the
    shipped demo model, whose decoder (fine-tuned on noisy latents) draws these off-world panels close to a constant;
    0.054 / 0.051 / 0.137 on the one before it, 0.035 / 0.054 / 0.13 on the one before that (bench/RESULTS.md, "Live
    preview"). An affine map no longer beats a constant colour on them, so what the preview must still show, where
    the object is, is the next test's."""
    fit = preview.projection_for(demo)
    with torch.inference_mode():
        z = preview.fit_latents(demo, seed=1)
        truth = preview.block_means(preview.decode_fn(demo)(z))
    error = lambda p: (p(z).clamp(0, 1) - truth).abs().mean().item()  # noqa: E731
    constant = (truth - truth.mean(dim=(0, 2, 3, 4), keepdim=True)).abs().mean().item()
    shuffled = error(shuffle(fit))
    print(f"held-out mean colour error: fitted {error(fit):.4f}, constant {constant:.4f}, shuffled {shuffled:.4f}")
    assert error(fit) <= 0.5 * shuffled


def shuffle(fit: preview.Projection) -> preview.Projection:
    """The same map with its latent channels in a seeded random order: the colours without the latents' meaning."""
    return preview.Projection(fit.weight[:, torch.randperm(12, generator=torch.Generator().manual_seed(0))], fit.bias)


def test_demo_decoder_fit_shows_where_the_object_is(demo):
    """On encoded clips of the demo world the projection's object blocks (farther than half the peak from the frame's
    median colour) overlap the decoded truth's: IoU 0.82 measured on the shipped model (0.77 on the one before it),
    0.44 with the channels shuffled."""
    from mochi_preview.demo.world import WorldConfig, sample_batch

    fit = preview.projection_for(demo)
    videos, _, _ = sample_batch(np.random.default_rng(3), 8, split="all", config=WorldConfig())
    with torch.inference_mode():
        z = torch.cat([denormalize_latents(demo._encode_pixels(v.permute(1, 2, 3, 0).numpy()), *demo.latent_stats)
                       for v in videos])  # fmt: skip
        truth = object_blocks(preview.block_means(preview.decode_fn(demo)(z)))

    def iou(projection: preview.Projection) -> float:
        shown = object_blocks(projection(z).clamp(0, 1))
        return ((shown & truth).sum() / (shown | truth).sum()).item()

    print(f"object blocks IoU: fitted {iou(fit):.3f}, shuffled {iou(shuffle(fit)):.3f}")
    assert iou(fit) >= 0.7 and iou(fit) >= 1.5 * iou(shuffle(fit))


def object_blocks(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) block colours -> bool (B, T, H, W): blocks farther than half the peak from the frame's median."""
    c = (rgb - rgb.flatten(3).median(dim=-1).values[..., None, None]).abs().amax(dim=1)
    return c > 0.5 * c.flatten(2).amax(dim=-1)[..., None, None]


def test_the_fit_is_cached_per_decoder_and_deterministic(demo):
    assert preview.projection_for(demo) is preview.projection_for(demo)
    again = MochiPipeline.from_pretrained(demo_model_dir(), torch_dtype=torch.float32, device="cpu")
    first, second = preview.projection_for(demo), preview.projection_for(again)
    assert first is not second  # another decoder object: fitted again, to the same numbers
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)


def test_a_model_without_an_encoder_fits_on_random_latents(tmp_path):
    pipe = MochiPipeline.from_pretrained(save_random_model(tmp_path / "m", encoder=False), torch_dtype=torch.float32)
    z = preview.fit_latents(pipe, n=3)
    assert z.shape == (1, 12, 2, 4, 4 * 3) and pipe.vae_encoder is None
    assert torch.equal(z, preview.fit_latents(pipe, n=3))  # seeded
    with torch.inference_mode():
        fit = preview.fit_projection(preview.decode_fn(pipe), z)
    assert fit.weight.shape == (3, 12) and torch.isfinite(fit.weight).all()


def test_predicted_clean_latents_from_two_euler_steps():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 12, 2, 4, 4, generator=g), torch.randn(1, 12, 2, 4, 4, generator=g)
    at = lambda s: s * eps + (1 - s) * x0  # noqa: E731  the straight flow path, which Euler steps follow
    assert torch.allclose(preview.predicted_clean(at(0.6), at(0.9), 0.6, 0.9), x0, atol=1e-5)


def test_preview_image_is_a_strip_of_frames_upscaled_by_nearest_neighbour():
    weight, bias = torch.zeros(3, 12), torch.zeros(3)
    weight[0, 0] = weight[1, 1] = weight[2, 2] = 1.0
    z = torch.zeros(2, 12, 7, 4, 6)
    z[:, 0, 6, 1, 2] = 1.0  # the last latent frame, one pixel red (mean 0, std 1: the decoder space)
    z[1, 2] = 0.5  # the second video: blue everywhere
    image = preview.preview_image(z, preview.Projection(weight, bias), [0.0] * 12, [1.0] * 12, frames=4)
    k = preview.PREVIEW_SIZE // 6
    assert image.dtype == np.uint8 and image.shape == (2 * 4 * k, 4 * 6 * k, 3)  # frames 0, 2, 4, 6
    red = image[: 4 * k, 3 * 6 * k :]  # video 0, its 4th panel: latent frame 6
    assert (red[k : 2 * k, 2 * k : 3 * k] == [255, 0, 0]).all() and red[:k].max() == 0 and red[:, 3 * k :].max() == 0
    assert (image[4 * k :, :, 2] == 128).all() and image[: 4 * k, : 3 * 6 * k].max() == 0


def test_previewer_shows_every_n_steps_and_the_last(demo):
    shown = []
    previewer = preview.Previewer(shown.append, every=2).prepare(demo)
    demo("a red ball", width=32, height=32, num_frames=13, num_inference_steps=5, seed=1, output_type="latent",
         callback_on_step_end=previewer, progress=False)  # fmt: skip
    assert len(shown) == 3  # after steps 2, 4 and 5
    assert all(s.shape == shown[0].shape and s.dtype == np.uint8 for s in shown)
    with pytest.raises(ValueError, match="--preview_every must be a whole number of steps >= 1; got 0"):
        preview.Previewer(shown.append, every=0)


def test_write_png_replaces_the_preview_whole(tmp_path):
    path = tmp_path / "preview.png"
    for value in (10, 200):
        preview.write_png(path, np.full((8, 16, 3), value, np.uint8))
        assert (np.asarray(Image.open(path)) == value).all()
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_previewer_shows_the_clean_latents_the_last_step_predicts(demo):
    shown, states = [], []
    previewer = preview.Previewer(shown.append).prepare(demo)

    def record(pipe, i, t, state):
        states.append(state["latents"].clone())
        previewer(pipe, i, t, state)

    demo("a red ball", width=32, height=32, num_frames=13, num_inference_steps=3, seed=1, output_type="latent",
         callback_on_step_end=record, progress=False)  # fmt: skip
    s, stats = [float(v) for v in demo.scheduler.sigmas], demo.latent_stats
    image = lambda z: preview.preview_image(z, previewer.projection, *stats)  # noqa: E731
    velocity = (states[1] - states[0]) / (s[2] - s[1])  # dz/dsigma of step 2
    assert np.array_equal(shown[1], image(states[1] - s[2] * velocity))
    assert not np.array_equal(shown[1], image(states[1]))
    assert np.array_equal(shown[0], image(states[0]))  # the first step has no previous latents: the current ones
