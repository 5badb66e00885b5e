"""Decoding modes: streaming equals full, tiles cross-fade without a seam, auto picks the least tiling that fits."""

from __future__ import annotations

import pytest
import torch
from vae_fixtures import randomize_, rel, single_thread  # noqa: F401 (autouse fixture)

from mochi_preview.vae import Decoder, DecoderConfig, estimate_decode_bytes, plan_decode
from mochi_preview.vae.decode import output_bytes, tile_spans


def small_decoder(seed: int = 1, scale: float = 0.3, **config) -> Decoder:
    config = {"channels": (32, 32, 32, 32), "num_res_blocks": (1, 1, 1, 1, 1), **config}
    return randomize_(Decoder(DecoderConfig(**config)), seed, scale)


def latents(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 12, t, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def decoder():
    return small_decoder()


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_equals_full(decoder, chunk):
    z = latents(5, 4, 4)
    full = decoder(z, mode="full")
    assert full.shape == (1, 3, 25, 32, 32)
    torch.testing.assert_close(decoder(z, mode="streaming", frames_per_chunk=chunk), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", [False, True])
def test_levels_stepped_over_time_equal_one_pass(attention):
    """forward_chunk's default runs each level a few frames at a time, in place: the one-pass numbers."""
    decoder = small_decoder(has_attention=(attention, False, attention, False, attention))
    z = latents(5, 3, 3)
    with torch.no_grad():
        one_pass = decoder.forward_chunk(z, step=None)
        for step in (1, 2, 3, 4):
            torch.testing.assert_close(decoder.forward_chunk(z, step=step), one_pass, atol=1e-5, rtol=0)
        cache, pieces = {}, []  # stepping inside streamed chunks too
        for t0 in range(0, 5, 2):
            pieces.append(decoder.forward_chunk(z[:, :, t0 : t0 + 2], cache, step=1))
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_pass, atol=1e-5, rtol=0)


def test_stepping_is_off_while_training():
    decoder = small_decoder()
    z = latents(3, 2, 2).requires_grad_(True)
    decoder.forward_chunk(z, step=1).square().mean().backward()  # no in-place writes in the graph
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_streaming_equals_full_with_attention():
    """A decoder with causal attention streams too: keys and values of earlier chunks are cached."""
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    z = latents(4, 3, 3)
    full = decoder(z, mode="full")
    torch.testing.assert_close(decoder(z, mode="streaming", frames_per_chunk=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder(z, mode="streaming", frames_per_chunk=3), full, atol=1e-5, rtol=0)


def test_stream_state_does_not_grow_with_frames(decoder):
    """What streaming carries between chunks is a fixed number of frames per convolution, whatever T is."""
    z = latents(6, 4, 4)
    cache = {}
    sizes = []
    for t in range(6):
        decoder.forward_chunk(z[:, :, t : t + 1], cache)
        sizes.append(sum(v.numel() for v in cache.values() if isinstance(v, torch.Tensor)))
    assert len(set(sizes[1:])) == 1 and sizes[0] == sizes[1]


def test_estimate_is_flat_for_streaming_and_grows_for_full():
    cfg = DecoderConfig()
    stream = [estimate_decode_bytes(cfg, 1, 1, 60, 106, torch.bfloat16, True, t) for t in (4, 16, 28)]
    full = [estimate_decode_bytes(cfg, 1, t, 60, 106, torch.bfloat16, False) for t in (4, 16, 28)]
    assert len(set(stream)) == 1
    assert full[0] < full[1] < full[2] and full[2] > 2 * stream[0]  # the whole video at each level vs one chunk


@pytest.mark.parametrize("tiles", [(1, 2), (3, 2), (2, 5), (4, 1)])
@pytest.mark.parametrize("overlap", [0, 2])
def test_tiling_is_exact_where_the_network_is_pointwise(tiles, overlap):
    """Without ResBlocks the decoder works per latent pixel: tiles, any count, must reassemble it exactly."""
    decoder = small_decoder(num_res_blocks=(0, 0, 0, 0, 0))
    z = latents(2, 9, 11)
    torch.testing.assert_close(
        decoder(z, mode="tiled", tiles=tiles, overlap=overlap), decoder(z, mode="full"), atol=1e-6, rtol=0
    )


def test_tiles_cross_fade_without_a_seam(decoder):
    """Tiles differ from full (per-tile norms, border padding), but the cross-fade leaves no seam."""
    z = latents(2, 8, 24)
    full = decoder(z, mode="full")

    def errors(overlap):
        tiled = decoder(z, mode="tiled", tiles=(1, 2), overlap=overlap)
        a, b = 8 * (12 - overlap // 2 - 1), 8 * (12 + overlap // 2 + 1)  # output columns around the seam
        return rel(tiled[..., a:b], full[..., a:b]), rel(tiled[..., :40], full[..., :40])

    seam_hard, _ = errors(0)
    seam_4, away_4 = errors(4)
    seam_8, away_8 = errors(8)
    assert seam_4 < 0.05 and seam_8 < 0.02
    assert seam_hard > 3 * seam_4  # plain concatenation shows the seam the blend removes
    assert seam_8 < 1.5 * away_8  # at the default overlap the seam is no worse than the rest of the tile


def test_tiled_and_streaming_combine(decoder):
    """Streaming is exact inside each tile, so tiled+streaming equals tiled."""
    z = latents(4, 6, 10)
    tiled = decoder(z, mode="tiled", tiles=(2, 3), overlap=2)
    combined = decoder(z, mode="tiled", tiles=(2, 3), overlap=2, frames_per_chunk=1)
    torch.testing.assert_close(combined, tiled, atol=1e-5, rtol=0)
    assert rel(tiled, decoder(z, mode="full")) < 0.1


def test_tile_spans_overlap_exactly():
    for length, count, overlap in [(60, 2, 8), (106, 4, 8), (106, 5, 8), (11, 3, 2), (7, 7, 0)]:
        spans = tile_spans(length, count, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length and len(spans) == count
        assert all(a_end - b_start == overlap for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
        sizes = [e - s for s, e in spans]
        assert max(sizes) - min(sizes) <= 1


def test_auto_picks_the_least_tiling_that_fits():
    cfg = DecoderConfig()
    shape = (1, 12, 28, 60, 106)  # 163 frames at 480x848
    video = output_bytes(cfg, shape)
    plans = [plan_decode(cfg, shape, torch.bfloat16, budget) for budget in (2**45, 20 * 2**30, 12 * 2**30, 6 * 2**30)]
    assert plans[0].frames_per_chunk is None and plans[0].tiles == (1, 1)  # everything fits: full decode
    assert plans[1].frames_per_chunk is not None and plans[1].tiles == (1, 1)  # exact streaming before tiles
    assert plans[2].tiles == (1, 1) and plans[2].frames_per_chunk < plans[1].frames_per_chunk
    assert plans[3].tiles != (1, 1)
    for plan, budget in zip(plans, (2**45, 20 * 2**30, 12 * 2**30, 6 * 2**30)):
        assert video < plan.estimated_bytes <= budget
    with pytest.raises(MemoryError, match=r"too small .* smallest plan .* output video"):
        plan_decode(cfg, shape, torch.bfloat16, 2**30)


def test_auto_with_a_budget_decodes_like_the_plan(decoder):
    z = latents(3, 8, 8)
    full = decoder(z, mode="full")
    assert decoder(z).shape == full.shape  # default: free memory, plenty here
    budget = plan_decode(decoder.config, tuple(z.shape), torch.float32, 2**40).estimated_bytes - 1
    plan = plan_decode(decoder.config, tuple(z.shape), torch.float32, budget)
    assert plan.frames_per_chunk is not None  # a full decode no longer fits
    out = decoder(z, mode="auto", memory_budget=budget)
    if plan.tiles == (1, 1):
        torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    with pytest.raises(MemoryError, match="too small"):
        decoder(z, mode="auto", memory_budget=1000)


def test_bf16_decoder_takes_fp32_latents():
    decoder = small_decoder()
    z = latents(1, 2, 2)
    reference = decoder(z, mode="full")
    decoder_bf16 = small_decoder().to(torch.bfloat16)
    out = decoder_bf16(z, mode="full")  # fp32 latents are cast at the entrance
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert rel(out, reference) < 0.05


@pytest.mark.parametrize(
    "z, options, message",
    [
        (torch.zeros(1, 12, 2, 4), {}, r"\(B, 12, T, H, W\)"),
        (torch.zeros(1, 16, 2, 4, 4), {}, r"\(B, 12, T, H, W\).*got shape \(1, 16, 2, 4, 4\)"),
        (torch.zeros(1, 12, 2, 4, 4), {"mode": "tiles"}, "mode must be one of"),
        (torch.zeros(1, 12, 2, 4, 4), {"mode": "full", "tiles": (2, 2)}, "use 'streaming' or 'tiled'"),
        (torch.zeros(1, 12, 2, 4, 4), {"mode": "tiled", "tiles": (3, 1), "overlap": 2}, "every tile must be"),
        (torch.zeros(1, 12, 2, 4, 4), {"mode": "streaming", "frames_per_chunk": 0}, "at least 1"),
        (torch.zeros(1, 12, 2, 4, 4), {"mode": "full", "memory_budget": 10**9}, "only applies to mode 'auto'"),
    ],
)
def test_bad_decoder_inputs_are_clear_errors(decoder, z, options, message):
    with pytest.raises(ValueError, match=message):
        decoder(z, **options)


def test_compiled_decoder_decodes_the_same_video():
    decoder = small_decoder(num_res_blocks=(0, 0, 0, 0, 2))  # two ResBlocks of one shape: one compiled graph
    z = latents(2, 2, 3)
    with torch.no_grad():
        eager = decoder(z, mode="full")
        compiled = decoder.compile_blocks()(z, mode="full")
    assert all("_residual" in vars(block) for block in decoder.blocks[0][1:])  # compiled per instance
    # Inductor reorders fp32 sums: equal to rounding, not bit for bit.
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
