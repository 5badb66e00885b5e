"""estimate.py: FLOP counts against torch's own count of real forwards, and estimates against the limits they feed."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mochi_preview.configs import dit_config
from mochi_preview.dit import AsymmDiT
from mochi_preview.estimate import Cost, Rates, decoder_flops, describe, dit_flops
from mochi_preview.vae import Decoder, DecoderConfig

SMALL = dit_config(depth=3, num_heads=2, dim_y=64, text_dim=32, head_dim=32)


def counted(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("text_valid", [7, 0])  # a prompt, and the empty negative prompt
def test_dit_flops_match_torchs_count(text_valid):
    """Within 1% of every matmul, convolution and attention product torch counts in a forward (the caption pool,
    timestep MLP and modulation, not counted, are that small at 576 visual tokens)."""
    model = AsymmDiT(SMALL).eval()
    latents = torch.randn(1, 12, 3, 32, 24)  # 3 frames of 16 x 12 patches
    feats, mask = torch.randn(1, 16, SMALL.text_dim), torch.arange(16)[None] < text_valid
    torch_count = counted(lambda: model(latents, torch.tensor([0.5]), feats, mask))
    ours = dit_flops(SMALL, visual=576, text=text_valid, text_len=16)
    assert ours == pytest.approx(torch_count, rel=0.01)


def test_decoder_flops_match_torchs_count():
    cfg = DecoderConfig(channels=(32, 32, 64, 64), num_res_blocks=(1, 1, 1, 1, 1))
    decoder = Decoder(cfg).eval()
    torch_count = counted(lambda: decoder(torch.randn(1, 12, 3, 4, 4)))
    assert decoder_flops(cfg, 3, 4, 4) == pytest.approx(torch_count, rel=0.01)


def test_observed_jobs_correct_the_rates():
    """The first finished job sets each stage's scale to what it took over what the probes said; later ones move it
    halfway (geometrically)."""
    from mochi_preview.estimate import Estimate

    rates = Rates(text=1.0, dit=Cost(fixed=0.0, rate=1e9), vae=Cost(fixed=0.5, rate=1e9))
    est = Estimate({"text": 1.0, "dit": 2.0, "vae": 1.0}, 0.1, 0.0, 0, 1, 0, 1, "cpu")
    rates.observe(est, {"text": 0.5, "dit": 8.0, "vae": 0.25})
    assert (rates.dit.scale, rates.vae.scale, rates.text) == (4.0, 0.25, 0.5)
    est = Estimate({"text": 0.5, "dit": 4.0 * 2.0, "vae": 0.25}, 0.1, 0.0, 0, 1, 0, 1, "cpu")
    rates.observe(est, {"dit": 2.0 * 16.0})
    assert rates.dit.scale == pytest.approx(8.0)  # sqrt(4 * 16)
    assert rates.dit.seconds(2e9, calls=2) == pytest.approx(8.0 * 2.0)


def test_describe():
    assert [describe(s) for s in (0.42, 12.4, 190, 7500)] == ["0.4 s", "12 s", "3 min 10 s", "2 h 05 min"]
