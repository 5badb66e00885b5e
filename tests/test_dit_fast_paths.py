"""The DiT's speed paths give the numbers of the plain ones: CPU half matmuls (upcast or native, chosen from the
instruction set), chunked attention, backend choice, opt-in torch.compile. (The flash-attn path:
tests/test_attention.py; RoPE tables: tests/test_rope.py.)"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from dit_fixtures import randomize_, text_inputs

from mochi_preview import AsymmDiT
from mochi_preview.configs import dit_config
from mochi_preview.dit import layers
from mochi_preview.dit.attention import AttentionKernel, available_backends, chunked_sdpa
from mochi_preview.dit.fp8 import FP8Linear, quantize_dit_fp8
from mochi_preview.dit.layers import compute_dtype, cpu_flags, cpu_half_path, decide_cpu_half_path, linear

torch.set_num_threads(1)
CFG = dit_config(depth=2, num_heads=2, dim_y=128, text_dim=64, head_dim=32)


@pytest.fixture(scope="module")
def model():
    return randomize_(AsymmDiT(CFG), seed=3).eval()


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(5)
    feats, mask = text_inputs(batch, valid=(3, 11)[:batch])
    return torch.randn(batch, 12, 3, 4, 6, generator=g), torch.tensor([0.9, 0.4][:batch]), feats, mask


@pytest.fixture
def fake_cpu(monkeypatch):
    """pretend(*flags, mkldnn=True): this CPU has those instruction-set flags (the cached choice is made again)."""

    def pretend(*flags, mkldnn=True):
        monkeypatch.setattr(layers, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)
        decide_cpu_half_path.cache_clear()

    monkeypatch.delenv("MOCHI_CPU_HALF", raising=False)
    decide_cpu_half_path.cache_clear()
    yield pretend
    decide_cpu_half_path.cache_clear()


@pytest.mark.parametrize(
    "flags, mkldnn, bf16, fp16",
    [
        ((), True, "upcast", "upcast"),
        (("avx2", "fma"), True, "upcast", "upcast"),  # this machine's kind (AMD EPYC without avx512_bf16)
        (("avx512f", "avx512_bf16"), True, "native", "upcast"),  # Zen 4, Cooper Lake
        (("amx_bf16", "amx_fp16", "avx512_fp16"), True, "native", "native"),  # Granite Rapids
        (("avx512_fp16",), True, "upcast", "native"),
        (("asimd", "bf16"), True, "native", "upcast"),  # aarch64, e.g. Neoverse V1
        (("avx512_bf16",), False, "upcast", "upcast"),  # PyTorch without oneDNN has no fast half kernels
    ],
)
def test_cpu_half_path_follows_the_instruction_set(fake_cpu, flags, mkldnn, bf16, fp16):
    fake_cpu(*flags, mkldnn=mkldnn)
    assert (cpu_half_path(torch.bfloat16), cpu_half_path(torch.float16)) == (bf16, fp16)
    assert compute_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if bf16 == "native" else torch.float32)
    assert compute_dtype(torch.float32, "cpu") == torch.float32  # fp32 is never touched
    assert compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16  # a GPU multiplies half inputs itself


def test_environment_overrides_the_choice(fake_cpu, monkeypatch):
    fake_cpu("avx512_bf16")
    monkeypatch.setenv("MOCHI_CPU_HALF", "upcast")
    decide_cpu_half_path.cache_clear()
    assert cpu_half_path(torch.bfloat16) == "upcast"
    fake_cpu()
    monkeypatch.setenv("MOCHI_CPU_HALF", "native")
    decide_cpu_half_path.cache_clear()
    assert cpu_half_path(torch.bfloat16) == "native"
    monkeypatch.setenv("MOCHI_CPU_HALF", "fast")
    decide_cpu_half_path.cache_clear()
    with pytest.raises(ValueError, match="MOCHI_CPU_HALF must be one of auto, native, upcast; got 'fast'"):
        cpu_half_path(torch.bfloat16)


def test_cpu_flags_are_those_every_core_has(tmp_path):
    x86 = "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
    (tmp_path / "x86").write_text(x86)
    (tmp_path / "arm").write_text(arm)
    assert cpu_flags(str(tmp_path / "x86")) == {"fpu", "avx2"}  # one core without bf16: not native
    assert cpu_flags(str(tmp_path / "arm")) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()  # no /proc (macOS, Windows): upcast, as before


def test_this_machine_upcasts_unless_it_has_bf16_instructions():
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    has_bf16 = any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))
    if "MOCHI_CPU_HALF" not in os.environ:
        assert cpu_half_path(torch.bfloat16) == (
            "native" if has_bf16 and torch.backends.mkldnn.is_available() else "upcast"
        )


@pytest.mark.parametrize("path", ["upcast", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_linear_on_cpu_is_one_rounding_of_the_exact_product(fake_cpu, path, dtype):
    fake_cpu(*(("amx_bf16", "amx_fp16") if path == "native" else ()))
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


def test_half_attention_on_an_upcast_cpu_runs_in_fp32(fake_cpu):
    fake_cpu("avx2")
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.bfloat16() for t in torch.randn(3, 1, 2, 20, 16, generator=g))
    out = chunked_sdpa(q, k, v, None, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


@pytest.mark.parametrize("with_mask", [False, True])
def test_half_attention_on_a_native_cpu_runs_in_bf16_close_to_fp32(fake_cpu, with_mask):
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.bfloat16() for t in torch.randn(3, 2, 2, 40, 16, generator=g))
    mask = (torch.rand(2, 1, 1, 40, generator=g) > 0.3) if with_mask else None
    fake_cpu("avx512_bf16")
    native = chunked_sdpa(q, k, v, mask, 8)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # PyTorch's own bf16 kernel
    fake_cpu()
    upcast = chunked_sdpa(q, k, v, mask, 8)
    assert native.dtype == upcast.dtype == torch.bfloat16
    assert torch.equal(native, whole)
    torch.testing.assert_close(native, upcast, rtol=2e-2, atol=2e-2)  # bf16 rounding of the probabilities


def test_model_output_does_not_depend_on_the_chunk(model):
    args = _inputs()
    with torch.no_grad():
        whole = model.set_attention("sdpa", chunk=0)(*args)
        chunked = model.set_attention("sdpa", chunk=5)(*args)  # 72 visual tokens in 15 blocks of queries
        auto = model.set_attention("auto")(*args)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto, whole, rtol=1e-5, atol=1e-5)


def bf16_copy(model):
    """A bf16 copy as load_dit makes it: RoPE frequencies and QK-norm weights kept fp32."""
    half, keep = copy.deepcopy(model), set(model.fp32_parameter_names())
    for name, p in half.named_parameters():
        if name not in keep:
            p.data = p.data.bfloat16()
    return half


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_model_gives_the_same_numbers_on_both_cpu_paths(model, fake_cpu):
    """Native bf16 kernels and the fp32 upcast agree to bf16 rounding; both stay within today's bf16 tolerance of
    the fp32 model (2e-2 relative, as in tests/test_dit_parity.py)."""
    latents, sigma, feats, mask = _inputs()
    half = bf16_copy(model)
    with torch.no_grad():
        ref = model(latents, sigma, feats, mask)
        out = {}
        for path, flags in (("upcast", ()), ("native", ("avx512_bf16",))):
            fake_cpu(*flags)
            out[path] = half(latents.bfloat16(), sigma, feats.bfloat16(), mask)
    assert not torch.equal(out["native"], out["upcast"])  # two paths were taken
    assert rel(out["upcast"], ref) <= 2e-2 and rel(out["native"], ref) <= 2e-2
    assert rel(out["native"], out["upcast"]) <= 2e-2


def test_fp8_dequantises_to_the_paths_dtype(model, fake_cpu, monkeypatch):
    latents, sigma, feats, mask = _inputs()
    fp8 = quantize_dit_fp8(bf16_copy(model), "channel")
    seen, real = [], FP8Linear.dequantized
    monkeypatch.setattr(
        FP8Linear, "dequantized", lambda self, dtype=torch.float32: seen.append(dtype) or real(self, dtype)
    )
    out = {}
    with torch.no_grad():
        for path, flags in (("upcast", ()), ("native", ("amx_bf16",))):
            fake_cpu(*flags)
            seen.clear()
            out[path] = fp8(latents.bfloat16(), sigma, feats.bfloat16(), mask)
            assert seen and set(seen) == {torch.float32 if path == "upcast" else torch.bfloat16}, path
    assert rel(out["native"], out["upcast"]) <= 2e-2


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
