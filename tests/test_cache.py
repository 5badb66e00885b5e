"""Step caching hooks (cache.py): exact when off, reuse above a threshold, per-branch state, the published rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from einops import rearrange

from mochi_preview.cache import (
    TEACACHE_COEFFICIENTS,
    FirstBlockCache,
    TeaCache,
    make_cache_hook,
    parse_cache_spec,
    relative_l1,
    teacache_rescale,
)
from mochi_preview.configs import dit_config
from mochi_preview.dit.layers import modulated_rms_norm
from mochi_preview.dit.model import AsymmDiT, init_weights
from mochi_preview.sampling import DiTCall, TextCondition, denoise, linear_quadratic_schedule

STEPS = 8
SIGMAS = linear_quadratic_schedule(STEPS)


@pytest.fixture(scope="module")
def dit() -> AsymmDiT:
    cfg = dit_config(depth=3, num_heads=2, dim_y=64, text_dim=32, head_dim=32)
    return init_weights(AsymmDiT(cfg), std=0.1, generator=torch.Generator().manual_seed(0)).eval()


def text(seed: int, length: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(torch.randn(1, length, 32, generator=g), torch.ones(1, length, dtype=torch.bool))


COND, UNCOND = text(1, 5), text(2, 3)
Z = torch.randn(1, 12, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def run(dit, hook=None, batch_cfg=False, guidance=4.5):
    with torch.no_grad():
        return denoise(dit, Z, SIGMAS, COND, UNCOND, guidance, batch_cfg, dit_hook=hook)


@pytest.mark.parametrize("spec", ["teacache:0", "first_block:0"])
@pytest.mark.parametrize("batch_cfg", [False, True])
def test_threshold_zero_is_identical_to_no_hook(dit, spec, batch_cfg):
    hook = make_cache_hook(spec)
    assert torch.equal(run(dit, hook, batch_cfg), run(dit, None, batch_cfg))
    calls = STEPS if batch_cfg else 2 * STEPS
    assert hook.record() == dict(cache=spec, dit_calls=calls, computed=calls, reused=0, reused_steps={})


@pytest.mark.parametrize("spec", [None, "", "off", " OFF "])
def test_off_gives_no_hook(spec):
    assert make_cache_hook(spec) is None


@pytest.mark.parametrize("spec", ["teacache:1", "first_block:1"])
def test_above_a_threshold_middle_steps_are_reused_first_and_last_computed(dit, spec):
    hook = make_cache_hook(spec)
    out = run(dit, hook)
    record = hook.record()
    assert set(record["reused_steps"]) == {"cond", "uncond"} and record["reused"] >= STEPS  # most middle steps
    computed = [(step, branch) for step, branch, c in hook.calls if c]
    assert computed[:2] == [(0, "cond"), (0, "uncond")]
    assert computed[-2:] == [(STEPS - 1, "cond"), (STEPS - 1, "uncond")]
    plain = run(dit)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert (out - plain).abs().mean() < 0.5 * plain.abs().mean()  # an approximation of the run, not noise


@pytest.mark.parametrize("cache", [TeaCache, FirstBlockCache])
def test_each_branch_reuses_its_own_state(dit, cache):
    hook = cache(threshold=1.0)
    call = lambda step, z, txt, branch: DiTCall(dit, step, 0.9, z, txt, branch, num_steps=4)  # noqa: E731
    with torch.no_grad():
        v_cond = hook(call(0, Z, COND, "cond"))
        v_uncond = hook(call(0, Z, UNCOND, "uncond"))
        assert not torch.allclose(v_cond, v_uncond, atol=1e-3)
        # The same inputs again at step 1: each branch gives back its own velocity, from its own cache.
        torch.testing.assert_close(hook(call(1, Z, COND, "cond")), v_cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hook(call(1, Z, UNCOND, "uncond")), v_uncond, rtol=1e-5, atol=1e-5)
        # Moved latents at step 2: a residual is reused (the output follows the new input), not the old velocity.
        z2 = Z * 0.98
        reused, fresh = hook(call(2, z2, COND, "cond")), call(2, z2, COND, "cond")()
        assert not torch.allclose(reused, v_cond, atol=1e-4) and not torch.allclose(reused, fresh, atol=1e-4)
    assert [c for _, _, c in hook.calls] == [True, True, False, False, False]


def test_teacache_decisions_follow_the_published_rule(dit):
    # Watch the pieces of the indicator (the embedded tokens and block 0's modulation) at every call, then replay
    # the published rule (spec 13.5) on them: its decisions must be the hook's.
    seen = []
    hooks = [
        dit.x_embedder.proj.register_forward_hook(lambda m, a, out: seen.append([out])),
        dit.blocks[0].mod_x.register_forward_hook(lambda m, a, out: seen[-1].append(out)),
    ]
    hook = make_cache_hook("teacache:0.06")
    try:
        with torch.no_grad():
            denoise(dit, Z, linear_quadratic_schedule(16), COND, None, 1.0, dit_hook=hook)
    finally:
        for h in hooks:
            h.remove()
    rescale = np.poly1d(TEACACHE_COEFFICIENTS)
    expected, previous, acc = [], None, 0.0
    for i, (embedded, mod, *_) in enumerate(seen):  # block 0 itself calls mod_x again when it runs
        x = rearrange(embedded, "(b t) d h w -> b (t h w) d", b=1)
        m = modulated_rms_norm(x, mod.chunk(4, dim=-1)[0])
        if i in (0, 15):
            compute = True
        else:
            acc += rescale(((m - previous).abs().mean() / previous.abs().mean()).item())
            compute = acc >= 0.06
        acc = 0.0 if compute else acc
        expected.append(compute)
        previous = m
    assert [c for _, _, c in hook.calls] == expected
    assert 0 < expected.count(False) < 14  # the threshold makes some reuse and some recompute


def test_rescale_and_distance():
    assert teacache_rescale(0.05) == pytest.approx(np.polyval(TEACACHE_COEFFICIENTS, 0.05), rel=1e-12)
    assert teacache_rescale(0.0) == pytest.approx(0.00305291719)
    assert relative_l1(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])) == pytest.approx(0.5)


def test_spec_parsing():
    assert parse_cache_spec("teacache") == ("teacache", 0.06)
    assert parse_cache_spec("teacache:0.1") == ("teacache", 0.1)
    assert parse_cache_spec("first_block:0.05") == ("first_block", 0.05)
    assert parse_cache_spec("first_block") == ("first_block", 0.03)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fbcache", "cache must be 'teacache"),
        ("TeaCache:0.1x", "cache must be"),
        ("teacache:abc", r"threshold must be a number in \[0, 1\]; got 'abc'"),
        ("teacache:-0.1", "threshold must be a number"),
        ("first_block:2", "threshold must be a number"),
        ("teacache:nan", "threshold must be a number"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        make_cache_hook(spec)


def test_a_model_other_than_the_dit_is_refused():
    toy = lambda z, sigma, feats, mask: torch.zeros_like(z)  # noqa: E731
    with pytest.raises(TypeError, match="needs the DiT itself"):
        denoise(toy, Z, SIGMAS, COND, None, 1.0, dit_hook=make_cache_hook("teacache"))


def test_through_the_pipeline_exact_when_off_and_reusing_above_a_threshold(tmp_path):
    from mochi_preview.pipeline import MochiPipeline
    from mochi_preview.tiny import save_random_model

    pipe = MochiPipeline.from_pretrained(save_random_model(tmp_path), torch_dtype=torch.float32, device="cpu")
    kw = dict(height=32, width=48, num_frames=7, num_inference_steps=6, output_type="latent", progress=False)
    plain = pipe("a cat", seed=4, batch_cfg=False, **kw).frames
    exact = make_cache_hook("first_block:0")
    assert torch.equal(pipe("a cat", seed=4, batch_cfg=False, dit_hook=exact, **kw).frames, plain)
    hook = make_cache_hook("teacache:1")
    cached = pipe("a cat", seed=4, batch_cfg=True, dit_hook=hook, **kw).frames
    assert hook.record()["reused_steps"] == {"both": [1, 2, 3, 4]} and not torch.equal(cached, plain)
