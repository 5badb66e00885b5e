"""The sigma schedule, initial noise and the Euler/CFG loop (spec section 5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mochi_preview.sampling import check_sigmas, denoise, get_noise, linear_quadratic_schedule

# The 65 published sigmas of the default 64-step schedule (spec 5.1), to the 6 decimals given there.
PUBLISHED_64 = [
    1.000000, 0.999219, 0.998437, 0.997656, 0.996875, 0.996094, 0.995313, 0.994531, 0.993750, 0.992969, 0.992188,
    0.991406, 0.990625, 0.989844, 0.989062, 0.988281, 0.987500, 0.986719, 0.985938, 0.985156, 0.984375, 0.983594,
    0.982812, 0.982031, 0.981250, 0.980469, 0.979688, 0.978906, 0.978125, 0.977344, 0.976562, 0.975781, 0.975000,
    0.973291, 0.969727, 0.964307, 0.957031, 0.947900, 0.936914, 0.924072, 0.909375, 0.892822, 0.874414, 0.854150,
    0.832031, 0.808057, 0.782227, 0.754541, 0.725000, 0.693604, 0.660352, 0.625244, 0.588281, 0.549463, 0.508789,
    0.466260, 0.421875, 0.375635, 0.327539, 0.277588, 0.225781, 0.172119, 0.116602, 0.059229, 0.000000,
]  # fmt: skip
FAST_8 = [1.0, 0.983333, 0.966667, 0.95, 0.933333, 0.916667, 0.9, 0.666667, 0.0]


def test_default_schedule_equals_published_list():
    sigmas = linear_quadratic_schedule(64, 0.025)
    assert len(sigmas) == 65
    assert sigmas == pytest.approx(PUBLISHED_64, abs=6e-7)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0


def test_fast_schedule_equals_published_list():
    assert linear_quadratic_schedule(8, 0.1, 6) == pytest.approx(FAST_8, abs=6e-7)


def test_schedule_matches_diffusers_copy():
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule as theirs

    for n, tau in [(64, 0.025), (30, 0.025), (8, 0.1)]:
        assert linear_quadratic_schedule(n, tau)[:-1] == pytest.approx(theirs(n, tau), abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "at least 1"),
        (dict(num_steps=8, linear_steps=8), "linear_steps must be in"),
        (dict(num_steps=8, threshold_noise=1.5), "threshold_noise"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        linear_quadratic_schedule(**kwargs)


@pytest.mark.parametrize(
    "sigmas, message",
    [([1.0], "at least 2"), ([1.0, 0.5, 0.6, 0.0], "decreasing"), ([1.2, 0.0], r"\[0, 1\]")],
)
def test_custom_sigmas_are_checked(sigmas, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(sigmas)


def test_noise_matches_diffusers_prepare_latents():
    from diffusers import MochiPipeline

    fake = SimpleNamespace(vae_spatial_scale_factor=8, vae_temporal_scale_factor=6)
    g = torch.Generator("cpu").manual_seed(1234)
    theirs = MochiPipeline.prepare_latents(fake, 1, 12, 64, 96, 13, torch.float32, "cpu", g)
    ours = get_noise(1, 13, 64, 96, seed=1234)
    assert ours.shape == (1, 12, 3, 8, 12) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, get_noise(1, 13, 64, 96, seed=1235))


def test_euler_with_constant_velocity_lands_on_target():
    # v = z0 - noise is constant along the straight flow path: Euler is exact for it, whatever the schedule.
    z0, noise = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    model = lambda z, sigma, feats, mask: (z0 - noise).expand_as(z)
    out = denoise(model, noise, linear_quadratic_schedule(7), cond=(None, None), uncond=None)
    assert torch.allclose(out, z0, atol=1e-6)


def test_cfg_uses_per_step_scales():
    # cond velocity 1, uncond 0 -> guided velocity = scale; with sigmas [1, .5, 0] z moves by .5*s0 + .5*s1.
    model = lambda z, sigma, feats, mask: torch.full_like(z, float(feats))
    cond, uncond = (torch.tensor(1.0), None), (torch.tensor(0.0), None)
    out = denoise(model, torch.zeros(1, 1), [1.0, 0.5, 0.0], cond, uncond, guidance=[2.0, 6.0])
    assert out.item() == pytest.approx(0.5 * 2.0 + 0.5 * 6.0)
    with pytest.raises(ValueError, match="guidance has 3 values but there are 2 steps"):
        denoise(model, torch.zeros(1, 1), [1.0, 0.5, 0.0], cond, uncond, guidance=[1.0, 2.0, 3.0])


def test_sampler_state_stays_fp32_with_a_bf16_model():
    seen = []

    def model(z, sigma, feats, mask):
        seen.append((z.dtype, sigma.dtype))
        return torch.ones_like(z, dtype=torch.bfloat16)

    out = denoise(model, torch.zeros(1, 4, dtype=torch.float32), [1.0, 0.3, 0.0], (None, None))
    assert out.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}
