"""The DiT's speed paths give the numbers of the plain ones: CPU half matmuls, chunked attention, backend choice,
opt-in torch.compile. (The flash-attn path: tests/test_attention.py; RoPE tables: tests/test_rope.py.)"""

from __future__ import annotations

import pytest
import torch
from dit_fixtures import randomize_, text_inputs

from mochi_preview import AsymmDiT
from mochi_preview.configs import dit_config
from mochi_preview.dit.attention import AttentionKernel, available_backends, chunked_sdpa
from mochi_preview.dit.layers import linear

torch.set_num_threads(1)
CFG = dit_config(depth=2, num_heads=2, dim_y=128, text_dim=64, head_dim=32)


@pytest.fixture(scope="module")
def model():
    return randomize_(AsymmDiT(CFG), seed=3).eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(5)
    feats, mask = text_inputs(batch, valid=(3, 11)[:batch])
    return torch.randn(batch, 12, 3, 4, 6, generator=g), torch.tensor([0.9, 0.4][:batch]), feats, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linear_on_cpu_is_one_rounding_of_the_exact_product(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    out = linear(x, w, b)
    assert out.dtype == dtype
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())  # half inputs are exact in fp64
    # One rounding to the half format: within half an ulp (2^-8 relative for bf16, 2^-11 for fp16) plus fp32 sums.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((out.double() - exact).abs() <= ulp * exact.abs() + 1e-5).all()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))  # what PyTorch's own half kernel gives


@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_attention_equals_one_call(with_mask):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 2, 50, 16, generator=g)
    mask = (torch.rand(2, 1, 1, 50, generator=g) > 0.3) if with_mask else None
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for chunk in (1, 7, 49, 50, 0):
        torch.testing.assert_close(chunked_sdpa(q, k, v, mask, chunk), whole, rtol=1e-6, atol=1e-6)


def test_half_attention_on_cpu_runs_in_fp32():
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.bfloat16() for t in torch.randn(3, 1, 2, 20, 16, generator=g))
    out = chunked_sdpa(q, k, v, None, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_model_output_does_not_depend_on_the_chunk(model):
    args = _inputs()
    with torch.no_grad():
        whole = model.set_attention("sdpa", chunk=0)(*args)
        chunked = model.set_attention("sdpa", chunk=5)(*args)  # 72 visual tokens in 15 blocks of queries
        auto = model.set_attention("auto")(*args)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=1e-5)


def test_auto_backend_and_errors():
    kernel = AttentionKernel("auto")
    assert kernel.backend == "auto" and kernel.resolve(torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="chunk"):
        AttentionKernel("sdpa", chunk=-1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        AttentionKernel("magic")
    if "sage" not in available_backends():
        with pytest.raises(ValueError, match="not installed here"):
            AttentionKernel("sage")


def test_rope_frequencies_changed_in_place_change_the_output(model):
    latents, sigma, feats, mask = _inputs()
    with torch.no_grad():
        first = model(latents, sigma, feats, mask)
        saved = model.pos_frequencies.clone()
        model.pos_frequencies.mul_(0.5)  # new frequencies (e.g. other weights loaded in place)
        changed = model(latents, sigma, feats, mask)
        model.pos_frequencies.copy_(saved)
        assert torch.equal(model(latents, sigma, feats, mask), first)
    assert not torch.equal(changed, first)


def test_training_rebuilds_the_tables_inside_the_graph():
    model = randomize_(AsymmDiT(CFG), seed=4).train()
    latents, sigma, feats, mask = _inputs(1)
    with torch.inference_mode():  # a generation first: nothing it caches may leak into the training graph
        model(latents, sigma, feats, mask)
    for _ in range(2):
        model(latents, sigma, feats, mask).square().mean().backward()
    assert model.pos_frequencies.grad is not None and model.pos_frequencies.grad.abs().sum() > 0


def test_compiled_blocks_give_the_same_velocity():
    model = randomize_(AsymmDiT(CFG), seed=3).eval()
    args = _inputs()
    with torch.no_grad():
        eager = model(*args)
        compiled = model.compile_blocks()(*args)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert set(model.state_dict()) == set(randomize_(AsymmDiT(CFG)).state_dict())  # checkpoints still load
    # Inductor fuses and reorders fp32 sums: equal to fp32 rounding, not bit for bit.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
