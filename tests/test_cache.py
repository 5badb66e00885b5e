"""Step caching hooks (cache.py): exact when off, reuse above a threshold, per-branch state, the published rule."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from einops import rearrange

from mochi_preview import cache
from mochi_preview.cache import (
    TEACACHE_COEFFICIENTS,
    TEACACHE_FIT_LIMIT,
    FirstBlockCache,
    TeaCache,
    make_cache_hook,
    parse_cache_spec,
    relative_l1,
    teacache_rescale,
)
from mochi_preview.configs import dit_config
from mochi_preview.distributed import CFGParallelDiT, ContextParallel, shard_dit
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
            denoise(dit, Z, linear_quadratic_schedule(32), COND, None, 1.0, dit_hook=hook)  # small early changes
    finally:
        for h in hooks:
            h.remove()
    rescale = lambda rel: np.polyval(TEACACHE_COEFFICIENTS, min(rel, TEACACHE_FIT_LIMIT))  # held at the fit's peak
    expected, previous, acc = [], None, 0.0
    for i, (embedded, mod, *_) in enumerate(seen):  # block 0 itself calls mod_x again when it runs
        x = rearrange(embedded, "(b t) d h w -> b (t h w) d", b=1)
        m = modulated_rms_norm(x, mod.chunk(4, dim=-1)[0])
        if i in (0, 31):
            compute = True
        else:
            acc += rescale(((m - previous).abs().mean() / previous.abs().mean()).item())
            compute = acc >= 0.06
        acc = 0.0 if compute else acc
        expected.append(compute)
        previous = m
    assert [c for _, _, c in hook.calls] == expected
    assert 0 < expected.count(False) < 30  # the threshold makes some reuse and some recompute


def test_rescale_and_distance():
    assert teacache_rescale(0.05) == pytest.approx(np.polyval(TEACACHE_COEFFICIENTS, 0.05), rel=1e-12)
    assert teacache_rescale(0.0) == pytest.approx(0.00305291719)
    # The fit rises to its peak (~0.108) and falls after it (negative past ~0.145): held at the peak from there.
    estimates = [teacache_rescale(x) for x in np.linspace(0.0, 1.0, 400)]
    assert all(b >= a for a, b in zip(estimates, estimates[1:]))
    peak = np.polyval(TEACACHE_COEFFICIENTS, TEACACHE_FIT_LIMIT)
    assert 0.1 < TEACACHE_FIT_LIMIT < 0.11 and np.polyval(TEACACHE_COEFFICIENTS, 0.15) < 0
    assert teacache_rescale(0.15) == teacache_rescale(1.0) == pytest.approx(peak) and peak > 0.09
    assert relative_l1(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 3.0])) == pytest.approx(0.5)
    # A weight of 0 leaves an element (a padding token) out of both sums.
    now, before = torch.tensor([2.0, 4.0, 9.0]), torch.tensor([1.0, 3.0, 1.0])
    assert relative_l1(now, before, weight=torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(0.5)


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


# ---- context parallelism: 2 CPU ranks (gloo), forked from this process --------------------------------------------

CP_STEPS = 10
CP_SIGMAS = linear_quadratic_schedule(CP_STEPS)
CP_SPECS = ["teacache:0.1", "first_block:0.5"]  # thresholds that reuse some calls of the tiny DiT and compute others
CP_GUIDANCE = [4.5] * 4 + [1.0] + [4.5] * 5  # step 4 runs the prompts alone (an odd batch under CFG parallelism)
CP_SHAPE = (1, 12, 3, 2, 10)  # 15 tokens: the second rank's share is padded


def cp_run(dit, spec: str, batch_cfg: bool, guidance=4.5) -> dict:
    """Latents, the hook's decisions and every indicator change it computed, for one cached denoise."""
    from distributed_worker import make_latents, make_text

    cond, uncond, _ = make_text()
    hook, changes = make_cache_hook(spec), []
    change = cache._Forward.change

    def spy(f, now, before):
        changes.append(change(f, now, before))
        return changes[-1]

    with mock.patch.object(cache._Forward, "change", spy), torch.no_grad():
        z = denoise(dit, make_latents(CP_SHAPE), CP_SIGMAS, cond, uncond, guidance, batch_cfg, dit_hook=hook)
    return dict(latents=z, calls=hook.calls, changes=changes)


def cp_cases(sequence_dit, cfg_dit) -> dict:
    """The cases as one process runs them (both DiTs the one-process DiT) or as the ranks do."""
    out = {}
    for spec in CP_SPECS:
        for batch_cfg in (False, True):
            out[f"sequence/{spec}/{batch_cfg}"] = cp_run(sequence_dit, spec, batch_cfg)
        out[f"cfg/{spec}"] = cp_run(cfg_dit, spec, True, CP_GUIDANCE)
    return out


PIPELINE_CALL = dict(height=32, width=48, num_frames=7, num_inference_steps=6, output_type="latent", progress=False)


def pipeline_run(pipe) -> dict:
    """The pipeline's latents with TeaCache (`cache=`, as the CLI passes it), batched branches (what CFG parallelism
    runs), and what it reused."""
    out = pipe("a cat", seed=4, batch_cfg=True, cache="teacache:1", **PIPELINE_CALL)
    return dict(latents=out.frames, record=out.cache)


def cp_rank_cases(model: Path) -> dict:
    """This rank's cases: sequence parallel over both ranks, one CFG half per rank, a sharded DiT (refused), then
    the pipeline on a model folder, sequence parallel and CFG parallel."""
    from distributed_worker import make_dit

    from mochi_preview.pipeline import MochiPipeline

    sequence = ContextParallel(cfg_parallel=False)
    dit = make_dit().set_token_layout(sequence.token_layout())
    cfg = ContextParallel(cfg_parallel=True)
    out = cp_cases(dit, CFGParallelDiT(make_dit().set_token_layout(cfg.token_layout()), cfg))
    sharded = shard_dit(make_dit().set_token_layout(sequence.token_layout()), sequence)
    for spec in CP_SPECS:
        try:
            cp_run(sharded, spec, False)
        except ValueError as e:
            out[f"sharded/{spec}"] = str(e)
    sequence.close()
    cfg.close()
    for cfg_parallel in (False, True):
        pipe = MochiPipeline.from_pretrained(model, torch_dtype=torch.float32, device="cpu")
        out[f"pipeline/{cfg_parallel}"] = pipeline_run(pipe.enable_context_parallel(cfg_parallel=cfg_parallel))
        pipe.cp.close()
    return out


@pytest.fixture(scope="module")
def cp_ranks(tmp_path_factory) -> dict:
    """Both ranks' cases (one launch of 2 forked ranks) and the model folder of the pipeline cases."""
    from distributed_worker import forked_ranks

    from mochi_preview.tiny import save_random_model

    folder = tmp_path_factory.mktemp("cache_cp")
    model = save_random_model(folder / "model")
    return dict(ranks=forked_ranks(lambda rank: cp_rank_cases(model), folder), model=model)


@pytest.fixture(scope="module")
def one_process() -> dict:
    from distributed_worker import make_dit

    dit = make_dit()
    return cp_cases(dit, dit)


@pytest.mark.parametrize(
    "case",
    [f"sequence/{s}/{b}" for s in CP_SPECS for b in (False, True)] + [f"cfg/{s}" for s in CP_SPECS],
)
def test_context_parallel_skips_the_steps_one_process_skips(cp_ranks, one_process, case):
    # Every rank takes one process's decisions from the same indicator values (each rank summed its share of the
    # tokens, the padding left out, and with CFG halves its rows), and the latents agree.
    want = one_process[case]
    reused = sum(not c for _, _, c in want["calls"])
    assert 0 < reused < len(want["calls"]) - 2, want["calls"]  # a mix of reused and computed calls
    for rank in cp_ranks["ranks"]:
        got = rank[case]
        assert got["calls"] == want["calls"]
        np.testing.assert_allclose(got["changes"], want["changes"], rtol=1e-5)
        err = float((got["latents"] - want["latents"]).abs().max() / want["latents"].abs().max())
        assert err < 1e-5, f"relative error {err:.2e}"


def test_a_sharded_dit_is_refused(cp_ranks):
    # On every rank at the first call, before any collective (no rank waits for another); and before any work.
    for rank in cp_ranks["ranks"]:
        for spec in CP_SPECS:
            assert "does not combine with a sharded DiT" in rank[f"sharded/{spec}"]
    for spec in CP_SPECS:
        with pytest.raises(ValueError, match="cache does not combine with a sharded DiT"):
            make_cache_hook(spec, sharded_dit=True)
    assert make_cache_hook("off", sharded_dit=True) is None


def test_the_pipeline_under_context_parallelism_reuses_what_one_process_reuses(cp_ranks):
    # The pipeline wraps the DiT for CFG parallelism (CFGParallelDiT) and passes the hook through: with the branches
    # on different ranks or the tokens split, the same calls are reused and the latents are one process's.
    from mochi_preview.pipeline import MochiPipeline

    want = pipeline_run(MochiPipeline.from_pretrained(cp_ranks["model"], torch_dtype=torch.float32, device="cpu"))
    assert want["record"]["dit_calls"] == 6 and want["record"]["reused"] == 4, want["record"]
    for rank in cp_ranks["ranks"]:
        for cfg_parallel in (False, True):
            got = rank[f"pipeline/{cfg_parallel}"]
            assert got["record"] == want["record"]
            err = float((got["latents"] - want["latents"]).abs().max() / want["latents"].abs().max())
            assert err < 1e-5, f"relative error {err:.2e}"


def test_cache_with_a_pusa_models_per_frame_conditioning_is_refused_before_any_work(tmp_path):
    from mochi_preview import pusa
    from mochi_preview.pipeline import MochiPipeline
    from mochi_preview.tiny import save_random_model

    folder = save_random_model(tmp_path / "model")
    (folder / "dit.safetensors").rename(folder / pusa.PUSA_DIT_FILE)
    pipe = MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    assert pipe.is_pusa
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="Pusa model's image or extend conditioning"):
        pipe("a cat", image=image, cache="teacache:0.1", **PIPELINE_CALL)
