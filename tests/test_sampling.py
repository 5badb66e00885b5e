"""The sigma schedule, initial noise and the Euler/CFG loop (spec section 5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mochi_preview.sampling import (
    PRESETS,
    DiTCall,
    TextCondition,
    check_sigmas,
    denoise,
    get_noise,
    linear_quadratic_schedule,
    pcm_linear_quadratic_schedule,
    schedule_sigmas,
)

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


# FastMochi's pcm_linear_quadratic schedule (spec 13.6), 8 steps from 50 and from 100 phases, to the 5 decimals given.
PCM_50 = [1.0, 0.984, 0.968, 0.952, 0.93333, 0.91733, 0.90133, 0.71755, 0.0]
PCM_100 = [1.0, 0.984, 0.96667, 0.95067, 0.93333, 0.91733, 0.9, 0.68432, 0.0]


@pytest.mark.parametrize("phases, published", [(50, PCM_50), (100, PCM_100)])
def test_pcm_schedule_equals_published_lists(phases, published):
    sigmas = pcm_linear_quadratic_schedule(8, phases)
    assert sigmas == pytest.approx(published, abs=6e-6)
    assert check_sigmas(sigmas) == sigmas


def test_fast_preset_is_fastmochis_recipe():
    assert PRESETS["fast"] == {"num_steps": 8, "cfg_scale": 1.5, "schedule": "pcm_linear_quadratic"}
    preset = PRESETS["fast"]
    assert schedule_sigmas(preset["schedule"], preset["num_steps"]) == pytest.approx(PCM_50, abs=6e-6)
    # The model card's native recipe is the plain schedule with its own threshold and linear steps.
    assert schedule_sigmas("linear_quadratic", 8, 0.1, 6) == pytest.approx(FAST_8, abs=6e-7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: schedule_sigmas("cosine", 8), "schedule must be one of"),
        (lambda: pcm_linear_quadratic_schedule(60, 50), r"num_steps must be in \[1, 50\]"),
        (lambda: pcm_linear_quadratic_schedule(8, 30), "phases must divide points"),
    ],
)
def test_schedule_choices_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


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
    out = denoise(model, noise, linear_quadratic_schedule(7), cond=TextCondition(None, None), uncond=None)
    assert torch.allclose(out, z0, atol=1e-6)


def test_cfg_uses_per_step_scales():
    # cond velocity 1, uncond 0 -> guided velocity = scale; with sigmas [1, .5, 0] z moves by .5*s0 + .5*s1.
    model = lambda z, sigma, feats, mask: torch.full_like(z, float(feats))
    cond, uncond = TextCondition(torch.tensor(1.0), None), TextCondition(torch.tensor(0.0), None)
    out = denoise(model, torch.zeros(1, 1), [1.0, 0.5, 0.0], cond, uncond, guidance=[2.0, 6.0])
    assert out.item() == pytest.approx(0.5 * 2.0 + 0.5 * 6.0)
    with pytest.raises(ValueError, match="guidance has 3 values but there are 2 steps"):
        denoise(model, torch.zeros(1, 1), [1.0, 0.5, 0.0], cond, uncond, guidance=[1.0, 2.0, 3.0])


def test_sampler_state_stays_fp32_with_a_bf16_model():
    seen = []

    def model(z, sigma, feats, mask):
        seen.append((z.dtype, sigma.dtype))
        return torch.ones_like(z, dtype=torch.bfloat16)

    out = denoise(model, torch.zeros(1, 4, dtype=torch.float32), [1.0, 0.3, 0.0], TextCondition(None, None))
    assert out.dtype == torch.float32 and set(seen) == {(torch.float32, torch.float32)}


def text(value: float, length: int = 2) -> TextCondition:
    """A one-prompt condition whose features all equal `value` (a toy model reads it back)."""
    return TextCondition(torch.full((1, length, 1), value), torch.ones(1, length, dtype=torch.bool))


def toy_model(z, sigma, feats, mask):
    """Velocity = the row's text value (cond 1, uncond 0), whatever the latents."""
    return feats[:, :1, :1, None].expand_as(z).clone()


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_dit_hook_sees_every_model_call(batch_cfg):
    calls = []

    def hook(call: DiTCall) -> torch.Tensor:
        calls.append((call.step, call.sigma, call.branch, len(call.latents), tuple(call.text.mask.shape)))
        assert call.num_steps == 2
        return call()

    sigmas, z = [1.0, 0.6, 0.0], torch.zeros(1, 1, 1, 1)
    plain = denoise(toy_model, z, sigmas, text(1.0), text(0.0, 3), guidance=4.0, batch_cfg=batch_cfg)
    hooked = denoise(toy_model, z, sigmas, text(1.0), text(0.0, 3), guidance=4.0, batch_cfg=batch_cfg, dit_hook=hook)
    assert torch.equal(plain, hooked) and plain.item() == pytest.approx(4.0)
    if batch_cfg:  # one call per step on [cond; uncond], the texts padded to one length
        assert calls == [(0, 1.0, "both", 2, (2, 3)), (1, 0.6, "both", 2, (2, 3))]
    else:
        assert calls == [
            (0, 1.0, "cond", 1, (1, 2)),
            (0, 1.0, "uncond", 1, (1, 3)),
            (1, 0.6, "cond", 1, (1, 2)),
            (1, 0.6, "uncond", 1, (1, 3)),
        ]
    calls.clear()
    denoise(toy_model, z, sigmas, text(1.0), text(0.0), guidance=[1.0, 4.0], batch_cfg=batch_cfg, dit_hook=hook)
    branches = [(step, branch) for step, _, branch, _, _ in calls]
    assert branches == [
        (0, "cond"),
        *([(1, "both")] if batch_cfg else [(1, "cond"), (1, "uncond")]),
    ]  # scale 1: cond only


def test_dit_hook_can_replace_the_velocity_or_edit_the_inputs():
    sigmas, z = [1.0, 0.5, 0.0], torch.zeros(1, 1, 1, 1)
    # A step cache: run the model at even steps, reuse each branch's velocity at odd steps.
    cache, runs = {}, []

    def reuse(call: DiTCall) -> torch.Tensor:
        if call.step % 2 == 0:
            runs.append(call.step)
            cache[call.branch] = call()
        return cache[call.branch]

    out = denoise(toy_model, z, sigmas, text(1.0), text(0.0), guidance=3.0, dit_hook=reuse)
    assert runs == [0, 0] and out.item() == pytest.approx(3.0)
    # Replaced velocities: 2 on the cond branch and 0 on the uncond one give 3 * 2 = 6 per unit of sigma.
    replace = lambda call: torch.full_like(call.latents, 2.0 if call.branch == "cond" else 0.0)
    assert denoise(toy_model, z, sigmas, text(1.0), text(0.0), guidance=3.0, dit_hook=replace).item() == 6.0
    # Edited inputs: the cond branch runs on another text (value 5): the guided velocity is 3 * 5.
    edit = lambda call: call(text=text(5.0)) if call.branch == "cond" else call()
    assert denoise(toy_model, z, sigmas, text(1.0), text(0.0), guidance=3.0, dit_hook=edit).item() == 15.0
