"""Attention backend choice and the flash-attn path, shown on the CPU with stand-ins.

There is no GPU here: the compute capability is faked (`torch.cuda.get_device_capability`, or the module's
`cuda_capability` to let the CPU pass as a capable GPU), and `flash_attn` is a fake package in sys.modules: a broken
one (imports, but its kernel raises, like a wheel built for another GPU) or a working one, a pure-torch
`flash_attn_varlen_func` that counts its calls and records what it was given.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from dit_fixtures import randomize_, text_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from mochi_preview import AsymmDiT
from mochi_preview.configs import dit_config
from mochi_preview.dit import attention
from mochi_preview.dit.attention import AttentionKernel, JointAttention, TextPacking, VarlenLayout

torch.set_num_threads(1)
CFG = dit_config(depth=2, num_heads=2, dim_y=128, text_dim=64, head_dim=32)


class FakeFlash:
    """flash_attn_varlen_func in pure torch: fp32 attention per sequence, output in the input dtype."""

    def __init__(self, broken: bool = False):
        self.broken, self.calls = broken, []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        if self.broken:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        assert q.dtype in (torch.float16, torch.bfloat16) and cu_q.dtype == torch.int32 and not causal
        with SYNCS.paused():  # a real kernel reads the offsets on the GPU; this stand-in reads them on the host
            bounds, bounds_k = cu_q.tolist(), cu_k.tolist()
        assert bounds == bounds_k and max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        out = torch.empty_like(q)
        for a, b in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))  # (H, n, d)
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).to(q.dtype)
        self.calls.append({"q": q, "out": out, "bounds": bounds, "max_len": max_q})
        return out


def install_flash(monkeypatch, fn=None) -> FakeFlash:
    """Put a fake `flash_attn` package in sys.modules (found by find_spec, imported by `from flash_attn import`)."""
    fn = fn or FakeFlash()
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = fn
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return fn


@pytest.fixture
def capable_cpu(monkeypatch):
    """Let the CPU pass for a compute capability 9.0 GPU (flash-attn's own requirements are then the fake's)."""
    monkeypatch.setattr(attention, "cuda_capability", lambda device: (9, 0))


class SyncCounter(TorchDispatchMode):
    """Counts the operations that make the host wait for a device's data: reading a value (`.item()`, `int()`,
    `bool()`, `.tolist()`), and ops whose output size depends on the data (boolean-mask indexing, nonzero, ...)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.count, self._paused = 0, False

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def note(self):
        if not self._paused:
            self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else [])
        )
        unsized = name == "repeat_interleave" and kwargs.get("output_size") is None
        if name in self.SYNCING or bool_index or unsized:
            self.note()
        return func(*args, **kwargs)


SYNCS = SyncCounter()


@contextmanager
def counting_syncs(monkeypatch):
    """SYNCS counts from here; `.tolist()` does not go through the dispatcher, so it is counted by wrapping."""
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: SYNCS.note() or real(self))
    SYNCS.count = 0
    with SYNCS:
        yield SYNCS
    monkeypatch.setattr(torch.Tensor, "tolist", real)


def half_model(backend: str = "auto", dtype=torch.bfloat16, seed: int = 3) -> AsymmDiT:
    """A bf16 model as load_dit makes it: RoPE frequencies and QK-norm weights kept fp32."""
    model = randomize_(AsymmDiT(CFG, attention_backend="sdpa"), seed=seed).eval()
    keep = set(model.fp32_parameter_names())
    for name, p in model.named_parameters():
        if name not in keep:
            p.data = p.data.to(dtype)
    return model.set_attention(backend)


def inputs(batch: int = 1, valid=(7,), dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(5)
    feats, mask = text_inputs(batch, valid=valid)
    latents = torch.randn(batch, 12, 3, 4, 6, generator=g)
    return latents.to(dtype), torch.linspace(0.9, 0.4, batch), feats.to(dtype), mask


def forward(model, args):
    with torch.inference_mode():
        return model(*args)


# ---- the choice --------------------------------------------------------------------------------------------------


def test_cpu_auto_is_sdpa_quietly():
    kernel = AttentionKernel("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.resolve("cpu", torch.bfloat16) == "sdpa"
    assert kernel.resolved == {(torch.device("cpu"), torch.bfloat16): "sdpa"} and kernel.backend == "auto"


@pytest.mark.parametrize(
    "capability, dtype, reason",
    [
        ((7, 5), torch.float16, "compute capability is 7.5; flash-attn needs 8.0"),  # Turing: no flash-attn 2
        ((6, 1), torch.bfloat16, "compute capability is 6.1"),
        ((9, 0), torch.float32, "fp16/bf16 inputs, not float32"),  # an fp32 model on an H100
    ],
)
def test_auto_skips_flash_where_it_cannot_run(monkeypatch, capability, dtype, reason):
    fake = install_flash(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    kernel = AttentionKernel("auto")
    with pytest.warns(UserWarning, match=reason) as record:
        assert kernel.resolve(torch.device("cuda", 0), dtype) == "sdpa"
        assert kernel.resolve(torch.device("cuda", 0), dtype) == "sdpa"  # decided once: no second note
    assert len(record) == 1 and len(str(record[0].message).splitlines()) == 1
    assert fake.calls == []  # not even a test call


def test_explicit_flash_that_cannot_run_is_an_error(monkeypatch, capable_cpu):
    install_flash(monkeypatch)
    model = randomize_(AsymmDiT(CFG, attention_backend="flash"), seed=3).eval()  # fp32 weights
    with pytest.raises(RuntimeError, match=r"'flash' cannot run float32 on cpu: flash-attn takes fp16/bf16"):
        forward(model, inputs(dtype=torch.float32))
    with pytest.raises(RuntimeError, match="'flash' cannot run float32"):
        model.resolve_attention()  # at load, before any work


@pytest.mark.parametrize(
    "error, reason",
    [
        (ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn"), "flash-attn is not installed"),
        # A wheel built against another torch: its extension fails to load.
        (
            ImportError("flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2E"),
            "flash-attn does not import "
            r"\(ImportError: flash_attn_2_cuda.so: undefined symbol",
        ),
    ],
)
def test_auto_without_an_importable_flash_attn_says_why(monkeypatch, capable_cpu, error, reason):
    def fail():
        raise error

    monkeypatch.setattr(attention, "_import_flash", fail)
    with pytest.warns(UserWarning, match=reason):
        assert AttentionKernel("auto").resolve("cpu", torch.float16) == "sdpa"


def test_broken_flash_attn_falls_back_to_sdpa_once(monkeypatch, capable_cpu):
    """A wheel that imports but whose kernel fails: the one test call catches it, every forward runs SDPA."""
    broken = install_flash(monkeypatch, FakeFlash(broken=True))
    model, want = half_model("auto"), forward(half_model("sdpa"), inputs())
    calls = []
    real = FakeFlash.__call__
    monkeypatch.setattr(FakeFlash, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [forward(model, inputs()) for _ in range(3)]
    assert [str(w.message) for w in record] == [
        "attention 'auto' runs PyTorch SDPA for bfloat16 on cpu: flash-attn's test call failed "
        "(RuntimeError: CUDA error: no kernel image is available for execution on the device)"
    ]
    assert len(calls) == 1 and broken.calls == []  # the test call only
    assert model.attention_backend_in_use == "sdpa"
    assert all(torch.equal(out, want) for out in outs)


def test_flash_attn_giving_wrong_numbers_is_not_used(monkeypatch, capable_cpu):
    install_flash(monkeypatch, lambda q, k, v, *args, **kwargs: torch.zeros_like(q))
    with pytest.warns(UserWarning, match=r"test call gave wrong numbers \(largest error"):
        assert AttentionKernel("auto").resolve("cpu", torch.bfloat16) == "sdpa"


def test_auto_takes_a_working_flash_attn_once_per_device_and_dtype(monkeypatch, capable_cpu):
    fake = install_flash(monkeypatch)
    model = half_model("auto")
    looked_up = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: looked_up.append(a) or real_find_spec(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note when flash-attn is taken
        for _ in range(3):
            forward(model, inputs())
    assert model.attention_backend_in_use == "flash"
    assert model.attention.resolved == {(torch.device("cpu"), torch.bfloat16): "flash"}
    assert len(fake.calls) == 1 + 3 * CFG.depth  # the test call, then one call per block per forward
    assert looked_up == []  # nothing is looked up per forward, let alone per call
    # Another dtype is another decision: fp16 takes flash-attn after its own test call, fp32 cannot.
    assert model.attention.resolve("cpu", torch.float16) == "flash" and len(fake.calls) == 2 + 3 * CFG.depth
    with pytest.warns(UserWarning, match="not float32"):
        assert model.attention.resolve("cpu", torch.float32) == "sdpa"


# ---- the flash path ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, valid", [(1, (7,)), (2, (7, 7)), (2, (7, 0)), (3, (2, 9, 5))])
def test_flash_path_equals_sdpa(monkeypatch, capable_cpu, batch, valid):
    """Equal prompts (no padding), batched CFG against the empty prompt, and three different lengths."""
    install_flash(monkeypatch)
    args = inputs(batch, valid)
    got, want = forward(half_model("auto"), args), forward(half_model("sdpa"), args)
    # Both compute attention in fp32 and round to bf16; they differ in fp32 summation order only.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_flash_gets_views_at_batch_one_without_padding(monkeypatch, capable_cpu):
    fake = install_flash(monkeypatch)
    model = half_model("auto")
    model.resolve_attention("cpu", torch.bfloat16)
    given = []
    real = JointAttention.__call__

    def spy(self, q, k, v):
        given.append((q, real(self, q, k, v)))
        return given[-1][1]

    monkeypatch.setattr(JointAttention, "__call__", spy)
    fake.calls.clear()
    forward(model, inputs(1, (7,)))
    n = 3 * 2 * 3 + 7  # 3 frames of 2 x 3 patches, then 7 text tokens
    assert len(fake.calls) == CFG.depth
    for (q, out), call in zip(given, fake.calls):
        assert call["q"].data_ptr() == q.data_ptr() and call["q"].shape == (n, CFG.num_heads, CFG.head_dim)
        assert out.data_ptr() == call["out"].data_ptr()  # and the output comes back as a view
        assert call["bounds"] == [0, n] and call["max_len"] == n


def test_flash_packs_only_real_tokens_when_padded(monkeypatch, capable_cpu):
    fake = install_flash(monkeypatch)
    model = half_model("auto")
    model.resolve_attention("cpu", torch.bfloat16)
    fake.calls.clear()
    forward(model, inputs(2, (7, 0)))  # batched CFG: the prompt, then the empty negative prompt
    assert all(c["bounds"] == [0, 18 + 7, 18 + 7 + 18] and c["max_len"] == 25 for c in fake.calls)


def test_packing_is_built_once_per_forward_with_one_sync(monkeypatch, capable_cpu):
    install_flash(monkeypatch)
    model = half_model("auto")
    model.resolve_attention("cpu", torch.bfloat16)  # the test call's own synchronisations happen here, once
    built = {"packing": 0, "varlen": 0}
    real_packing, real_varlen = TextPacking.from_mask, VarlenLayout.build

    def count(kind, real):
        return classmethod(lambda cls, *a: built.__setitem__(kind, built[kind] + 1) or real(*a))

    monkeypatch.setattr(TextPacking, "from_mask", count("packing", real_packing))
    monkeypatch.setattr(VarlenLayout, "build", count("varlen", real_varlen))
    for batch, valid in [(1, (7,)), (2, (7, 0)), (3, (2, 9, 5))]:
        with counting_syncs(monkeypatch) as syncs:
            forward(model, inputs(batch, valid))
        assert syncs.count == 1, (batch, valid)  # the per-sample text counts, read once for all blocks
    assert built == {"packing": 3, "varlen": 3}


@pytest.mark.parametrize("valid", [(7,), (7, 0)])
def test_sdpa_forward_synchronises_once(monkeypatch, valid):
    model = half_model("sdpa")
    with counting_syncs(monkeypatch) as syncs:
        forward(model, inputs(len(valid), valid))
    assert syncs.count == 1


def test_the_sync_counter_sees_the_old_packing():
    """What the counter counts: the former flash path's `int(lengths.max())` and boolean-mask packing."""
    keep = torch.tensor([True, True, False, True])
    with SYNCS:
        SYNCS.count = 0
        int(keep.sum())
        torch.randn(4, 2)[keep]
        full = torch.zeros(4, 2)
        full[keep] = torch.ones(3, 2)
    assert SYNCS.count == 3
