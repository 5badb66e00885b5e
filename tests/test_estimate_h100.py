"""bench/estimate_h100.py: its FLOP and parameter counts against real models, and the sanity of its memory model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mochi_preview.configs import dit_config
from mochi_preview.dit import AsymmDiT, DiTConfig
from mochi_preview.vae import Decoder, DecoderConfig

_path = Path(__file__).resolve().parents[1] / "bench" / "estimate_h100.py"
_spec = importlib.util.spec_from_file_location("estimate_h100", _path)
est = sys.modules.setdefault("estimate_h100", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(est)

SMALL = dit_config(depth=2, num_heads=2, dim_y=64, text_dim=32, head_dim=32)
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731


@pytest.mark.parametrize("text_valid", [5, 0])  # a prompt, and the empty negative prompt (no text in attention)
def test_forward_flops_match_flop_counter(text_valid):
    """The hand count equals torch's own count of every matmul and convolution of a real forward.

    SDPA is forced to its math backend so that the attention matmuls are visible to FlopCounterMode.
    """
    torch.manual_seed(0)
    model = AsymmDiT(SMALL).eval()
    latents = torch.randn(1, 12, 3, 4, 6)  # 3 frames of 2 x 3 patches
    feats, mask = torch.randn(1, 16, SMALL.text_dim), torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :text_valid] = True
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(latents, torch.tensor([0.5]), feats, mask)
    ours = est.dit_forward_flops(SMALL, visual=18, text_valid=text_valid, text_len=16)
    assert sum(ours.values()) == counter.get_total_flops()


def test_parameter_counts_match_models():
    with torch.device("meta"):
        published, small, decoder = AsymmDiT(DiTConfig()), AsymmDiT(SMALL), Decoder(DecoderConfig())
    assert est.dit_parameters(est.DIT)["total"] == count(published) == 10_027_677_744  # spec §0
    assert est.dit_parameters(SMALL)["total"] == count(small)
    assert est.dit_parameters(est.DIT)["block_max"] == max(count(b) for b in published.blocks)
    assert est.decoder_parameters(DecoderConfig()) == count(decoder) == 362_526_595  # spec §3.2


def test_t5_parameter_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu"
    )
    with torch.device("meta"):
        t5 = transformers.T5EncoderModel(config)
    ours = est.t5_parameters()
    assert ours["total"] == count(t5)
    assert ours["block"] == count(t5.encoder.block[1])  # block 0 also holds the relative position bias


def test_attention_share_agrees_with_the_quoted_71_percent():
    f = est.dit_forward_flops(est.DIT, est.visual_tokens(163), est.TEXT_LEN)
    assert est.visual_tokens(163) == 44_520  # spec §3.4
    assert f["attention"] / (est.linear_flops(f) + f["attention"]) == pytest.approx(0.71, abs=0.005)


@pytest.mark.parametrize("case", [est.LOW, est.HIGH], ids=lambda c: c.name)
def test_memory_and_time_grow_with_frames_and_modes_are_ordered(case):
    for vae in ("full", "tiled", "tiled+streamed"):
        for mode in est.MODES:
            peaks = [est.peak_bytes(f, mode, vae, case) for f in est.FRAMES]
            assert peaks == sorted(peaks), (mode, vae)
        for f in est.FRAMES:
            modes = ("resident bf16", "model offload bf16", "sequential offload bf16")
            resident, model, sequential = (est.peak_bytes(f, m, vae, case) for m in modes)
            assert sequential <= model <= resident
            assert est.peak_bytes(f, "resident fp8, T5 bf16", vae, case) < resident
    acts = [est.dit_activation_bytes(est.DIT, est.visual_tokens(f), est.TEXT_VALID, 1, case) for f in est.FRAMES]
    assert acts == sorted(acts) and len(set(acts)) == len(acts)
    for mode in est.MODES:
        times = [est.video_seconds(f, mode, "tiled", case)["total"] for f in est.FRAMES]
        assert times == sorted(times)


def test_low_end_is_below_high_end():
    for f in est.FRAMES:
        for mode in est.MODES:
            for vae in ("full", "tiled", "auto"):
                assert est.peak_bytes(f, mode, vae, est.LOW) <= est.peak_bytes(f, mode, vae, est.HIGH)
            lo, hi = (est.video_seconds(f, mode, "tiled", c)["total"] for c in (est.LOW, est.HIGH))
            assert lo < hi


def test_main_writes_the_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "estimate.md"
    monkeypatch.setattr("sys.argv", ["estimate_h100.py", "--output", str(out)])
    est.main()
    text = out.read_text(encoding="utf-8")
    assert text.strip() == capsys.readouterr().out.strip()
    assert "| 163 |" in text and "not published in our spec" in text
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind
