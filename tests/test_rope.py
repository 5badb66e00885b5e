"""RoPE tables: fp32 angles whatever the caller's autocast or matmul precision, and never older than the weights."""

from __future__ import annotations

import pytest
import torch
from dit_fixtures import randomize_, text_inputs

from mochi_preview import AsymmDiT
from mochi_preview.configs import dit_config
from mochi_preview.dit import model as dit_model
from mochi_preview.dit import rope
from mochi_preview.dit.rope import rope_cos_sin, rope_positions

torch.set_num_threads(1)
CFG = dit_config(depth=2, num_heads=2, dim_y=128, text_dim=64, head_dim=32)


@pytest.fixture
def model():
    return randomize_(AsymmDiT(CFG), seed=3).eval()


def _inputs(frames: int = 3):
    g = torch.Generator().manual_seed(5)
    feats, mask = text_inputs(2, valid=(3, 11))
    return torch.randn(2, 12, frames, 4, 6, generator=g), torch.tensor([0.9, 0.4]), feats, mask


def run(model, args):
    with torch.inference_mode():
        return model(*args)


def published_grid_tables():
    """Frequencies like trained ones at a 480x848 grid's positions (2 frames of the 28: enough for the check)."""
    freqs = 0.5 * torch.randn(3, 24, 64, generator=torch.Generator().manual_seed(0))
    return freqs, rope_positions(2, 30, 53)


def test_tables_ignore_cpu_autocast():
    freqs, positions = published_grid_tables()
    want = rope_cos_sin(freqs, positions)
    with torch.autocast("cpu", torch.bfloat16):
        got = rope_cos_sin(freqs, positions)
        # What the guard prevents: the same einsum under autocast rounds positions and frequencies to bf16.
        theta = torch.einsum("nd,dhf->nhf", positions, freqs)
    assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))
    assert theta.dtype == torch.bfloat16 and (theta.float().cos() - want[0]).abs().max() > 0.1


def test_tables_use_ieee_fp32_matmuls_and_restore_the_callers_setting(monkeypatch):
    """TF32 (CUDA) or bf16 (oneDNN) fp32 matmuls set by the caller are off inside, and back on after."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = cuda.fp32_precision, mkldnn.fp32_precision
    seen = []
    real = torch.einsum
    monkeypatch.setattr(
        rope.torch, "einsum", lambda *a: seen.append((cuda.fp32_precision, mkldnn.fp32_precision)) or real(*a)
    )
    freqs, positions = published_grid_tables()
    try:
        cuda.fp32_precision, mkldnn.fp32_precision = "tf32", "bf16"
        rope_cos_sin(freqs, positions)
        after = cuda.fp32_precision, mkldnn.fp32_precision
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved
    assert seen == [("ieee", "ieee")] and after == ("tf32", "bf16")


def test_a_write_through_data_is_seen_by_the_next_forward(model):
    args = _inputs()
    run(model, args)  # a generation ran with the old frequencies
    new = 0.5 * torch.randn(model.pos_frequencies.shape, generator=torch.Generator().manual_seed(9))
    version = model.pos_frequencies._version
    model.pos_frequencies.data.copy_(new)  # e.g. weights swapped in by a LoRA loader: no version bump
    assert model.pos_frequencies._version == version
    fresh = randomize_(AsymmDiT(CFG), seed=3).eval()
    with torch.no_grad():
        fresh.pos_frequencies.copy_(new)
    assert torch.equal(run(model, args), run(fresh, args))
    model.pos_frequencies.data = new.clone()  # a new tensor behind the parameter: seen too
    assert torch.equal(run(model, args), run(fresh, args))


def test_tables_are_computed_once_per_forward_and_not_kept(model, monkeypatch):
    calls, positions = [], []
    real_tables, real_positions = dit_model.rope_cos_sin, dit_model.rope_positions
    monkeypatch.setattr(dit_model, "rope_cos_sin", lambda *a: calls.append(1) or real_tables(*a))
    monkeypatch.setattr(dit_model, "rope_positions", lambda *a: positions.append(a) or real_positions(*a))
    args = _inputs()
    first = run(model, args)
    assert torch.equal(run(model, args), first)
    assert len(calls) == 2  # once per forward, for all blocks
    assert positions == [(3, 2, 3)]  # the positions depend on the grid only: kept on the device
    run(model, _inputs(frames=2))  # another grid
    assert positions == [(3, 2, 3), (2, 2, 3)] and len(calls) == 3
    # Nothing the size of the tables stays behind: only the (N, 3) positions, until release_tables.
    kept = [v for v in vars(model).values() if isinstance(v, torch.Tensor)]
    assert kept == [] and model._positions[1].shape == (2 * 2 * 3, 3)
    assert model.release_tables() is model and model._positions is None
    assert torch.equal(run(model, args), first)
