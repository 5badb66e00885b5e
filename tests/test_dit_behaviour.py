"""AsymmDiT behaviour: any batch size, text masking, batched CFG, config inference, input errors."""

from __future__ import annotations

import pytest
import torch
from dit_fixtures import randomize_, text_inputs

from mochi_preview import AsymmDiT, DiTConfig
from mochi_preview.configs import CONFIGS, dit_config
from mochi_preview.dit import infer_dit_config
from mochi_preview.dit.tokens import TokenLayout
from mochi_preview.sampling import TextCondition, denoise, linear_quadratic_schedule

CFG = dit_config(depth=3, num_heads=2, dim_y=128, text_dim=64)


@pytest.fixture(scope="module")
def model():
    return randomize_(AsymmDiT(CFG), seed=3).eval()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 12, 2, 4, 6, generator=torch.Generator().manual_seed(5))


def test_batch_equals_single_samples(model, latents):
    feats, mask = text_inputs(2, valid=(3, 11))  # different valid counts: the batched path needs a key mask
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        both = model(latents, sigma, feats, mask)
        one = [model(latents[i : i + 1], sigma[i : i + 1], feats[i : i + 1], mask[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(one), rtol=1e-5, atol=1e-5)


def test_padded_text_positions_do_not_matter(model, latents):
    feats, mask = text_inputs(2)
    garbage = feats.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), feats.shape[-1])
    with torch.no_grad():
        a = model(latents, torch.tensor([0.5, 0.5]), feats, mask)
        b = model(latents, torch.tensor([0.5, 0.5]), garbage, mask)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_valid_tokens_need_not_be_a_prefix(model, latents):
    # The same tokens at other positions (with padding in between) give the same result: text has no position.
    feats, mask = text_inputs(1, valid=(4,))
    spread_feats, spread_mask = torch.zeros_like(feats), torch.zeros_like(mask)
    spread_feats[0, [1, 5, 6, 12]] = feats[0, :4]
    spread_mask[0, [1, 5, 6, 12]] = True
    with torch.no_grad():
        a = model(latents[:1], 0.3, feats, mask)
        b = model(latents[:1], 0.3, spread_feats, spread_mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fully_masked_prompt_runs_and_differs_from_text(model, latents):
    feats, mask = text_inputs(2)
    empty = torch.zeros_like(mask)
    with torch.no_grad():
        out = model(latents, torch.tensor([0.5, 0.5]), feats, empty)
        with_text = model(latents, torch.tensor([0.5, 0.5]), feats, mask)
        # Features are ignored entirely when nothing is valid.
        out2 = model(latents, torch.tensor([0.5, 0.5]), torch.randn_like(feats), empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    assert (out - with_text).abs().max() > 1e-3


def test_batched_cfg_equals_sequential_cfg(model):
    z = torch.randn(1, 12, 2, 4, 6, generator=torch.Generator().manual_seed(7))
    feats, mask = text_inputs(1, valid=(6,))
    cond = TextCondition(feats, mask)
    uncond = TextCondition(torch.zeros_like(feats), torch.zeros_like(mask))  # the "no text" negative prompt
    sigmas = linear_quadratic_schedule(3)
    with torch.no_grad():
        seq = denoise(model, z, sigmas, cond, uncond, guidance=4.5, batch_cfg=False)
        bat = denoise(model, z, sigmas, cond, uncond, guidance=4.5, batch_cfg=True)
    torch.testing.assert_close(bat, seq, rtol=1e-5, atol=1e-5)


def test_published_preset_sizes():
    cfg = CONFIGS["mochi-1-preview"].dit
    assert (cfg.dim_x, cfg.mlp_hidden_x, cfg.mlp_hidden_y) == (3072, 8192, 4096)
    with torch.device("meta"):
        model = AsymmDiT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 10_027_677_744  # spec section 0
    state = model.state_dict()
    assert len(state) == 879  # the native checkpoint's tensor count (spec 2.1)
    assert infer_dit_config({k: v.shape for k, v in state.items()}) == cfg


def test_one_process_layout_is_the_identity():
    layout = TokenLayout()
    t = torch.randn(2, 6, 12)
    assert layout.split_tokens(t) is t and layout.tokens_to_heads(t, num_tokens=6) is t
    assert layout.heads_to_tokens(t) is t and layout.local_heads(t, dim=1) is t
    assert layout.gather_heads(t) is t and layout.gather_tokens(t, num_tokens=6) is t


def test_one_process_forward_never_touches_torch_distributed(model, latents, monkeypatch):
    import torch.distributed as dist

    feats, mask = text_inputs(2, valid=(3, 11))
    with torch.no_grad():
        want = model(latents, torch.tensor([0.9, 0.4]), feats, mask)

    def refuse(*args, **kwargs):
        raise AssertionError("the one-process forward used torch.distributed")

    talk = ["all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast"]
    for name in [*talk, "send", "recv", "barrier", "is_initialized", "get_rank", "get_world_size", "new_group"]:
        monkeypatch.setattr(dist, name, refuse)
    assert type(model.token_layout) is TokenLayout  # the default
    with torch.no_grad():
        got = model.set_token_layout(None)(latents, torch.tensor([0.9, 0.4]), feats, mask)
    assert type(model.token_layout) is TokenLayout and torch.equal(got, want)


def test_config_inferred_from_reduced_shapes():
    cfg = DiTConfig(depth=2, num_heads=3, head_dim=64, dim_y=96, mlp_hidden_x=500, mlp_hidden_y=300, text_dim=40)
    with torch.device("meta"):
        state = AsymmDiT(cfg).state_dict()
    assert infer_dit_config({k: v.shape for k, v in state.items()}) == cfg


@pytest.mark.parametrize(
    "shape, feats_shape, message",
    [
        ((1, 11, 2, 4, 6), (1, 16, 64), r"latents must be \(B, 12, T, H, W\)"),
        ((1, 12, 2, 5, 6), (1, 16, 64), "multiples of the patch size 2"),
        ((1, 12, 2, 4, 6), (1, 16, 32), r"text_features must be \(1, L, 64\)"),
    ],
)
def test_bad_inputs_are_explained(model, shape, feats_shape, message):
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape), 0.5, torch.zeros(feats_shape))


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="unknown attention backend 'magic'"):
        AsymmDiT(CFG, attention_backend="magic")


def test_the_attention_backend_that_ran_is_recorded(latents):
    model = randomize_(AsymmDiT(CFG, attention_backend="auto"), seed=3).eval()
    assert model.attention_backend_in_use == "sdpa"  # before any forward: resolved for the weights' device
    feats, mask = text_inputs(2)
    with torch.no_grad():
        model(latents, torch.tensor([0.5, 0.5]), feats, mask)
    assert model.attention_backend_in_use == "sdpa" and model.attention.in_use == "sdpa"
