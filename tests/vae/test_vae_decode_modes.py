"""Decoding modes: streaming equals full, tiles cross-fade without a seam, auto picks the least tiling that fits; the
stream state and its cross-rank variant; one plan search for one process and for the time split."""

from __future__ import annotations

import pytest
import torch
from vae_fixtures import randomize_, rel, single_thread  # noqa: F401 (autouse fixture)

from mochi_preview.vae import (
    Decoder,
    DecoderConfig,
    RankBoundaryState,
    StreamState,
    decode,
    estimate_decode_bytes,
    plan_decode,
)
from mochi_preview.vae.decode import output_bytes, tile_spans, video_bytes
from mochi_preview.vae.layers import CausalConv3d, CausalTemporalAttention, DepthToSpaceTime


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
    full = decode(decoder, z, mode="full")
    assert full.shape == (1, 3, 25, 32, 32)
    torch.testing.assert_close(decode(decoder, z, mode="streaming", frames_per_chunk=chunk), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", [False, True])
def test_levels_stepped_over_time_equal_one_pass(attention):
    """The network's default runs each level a few frames at a time, in place: the one-pass numbers."""
    decoder = small_decoder(has_attention=(attention, False, attention, False, attention))
    z = latents(5, 3, 3)
    with torch.no_grad():
        one_pass = decoder(z, step=None)
        for step in (1, 2, 3, 4):
            torch.testing.assert_close(decoder(z, step=step), one_pass, atol=1e-5, rtol=0)
        state, pieces = StreamState(), []  # stepping inside streamed chunks too
        for t0 in range(0, 5, 2):
            pieces.append(decoder(z[:, :, t0 : t0 + 2], state, step=1))
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_pass, atol=1e-5, rtol=0)


def test_stepping_is_off_while_training():
    decoder = small_decoder()
    z = latents(3, 2, 2).requires_grad_(True)
    decoder(z, step=1).square().mean().backward()  # no in-place writes in the graph
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_streaming_equals_full_with_attention():
    """A decoder with causal attention streams too: keys and values of earlier chunks are cached."""
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    z = latents(4, 3, 3)
    full = decode(decoder, z, mode="full")
    torch.testing.assert_close(decode(decoder, z, mode="streaming", frames_per_chunk=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(decode(decoder, z, mode="streaming", frames_per_chunk=3), full, atol=1e-5, rtol=0)


def test_stream_state_does_not_grow_with_frames(decoder):
    """What streaming carries between chunks is a fixed number of frames per convolution, whatever T is."""
    z = latents(6, 4, 4)
    state = StreamState()
    sizes = []
    for t in range(6):
        decoder(z[:, :, t : t + 1], state)
        sizes.append(state.nbytes)
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
        decode(decoder, z, mode="tiled", tiles=tiles, overlap=overlap),
        decode(decoder, z, mode="full"),
        atol=1e-6,
        rtol=0,
    )


def test_tiles_cross_fade_without_a_seam(decoder):
    """Tiles differ from full (per-tile norms, border padding), but the cross-fade leaves no seam."""
    z = latents(2, 8, 24)
    full = decode(decoder, z, mode="full")

    def errors(overlap):
        tiled = decode(decoder, z, mode="tiled", tiles=(1, 2), overlap=overlap)
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
    tiled = decode(decoder, z, mode="tiled", tiles=(2, 3), overlap=2)
    combined = decode(decoder, z, mode="tiled", tiles=(2, 3), overlap=2, frames_per_chunk=1)
    torch.testing.assert_close(combined, tiled, atol=1e-5, rtol=0)
    assert rel(tiled, decode(decoder, z, mode="full")) < 0.1


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
    full = decode(decoder, z, mode="full")
    assert decode(decoder, z).shape == full.shape  # default: free memory, plenty here
    budget = plan_decode(decoder.config, tuple(z.shape), torch.float32, 2**40).estimated_bytes - 1
    plan = plan_decode(decoder.config, tuple(z.shape), torch.float32, budget)
    assert plan.frames_per_chunk is not None  # a full decode no longer fits
    out = decode(decoder, z, mode="auto", memory_budget=budget)
    if plan.tiles == (1, 1):
        torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    with pytest.raises(MemoryError, match="too small"):
        decode(decoder, z, mode="auto", memory_budget=1000)


def test_bf16_decoder_takes_fp32_latents():
    decoder = small_decoder()
    z = latents(1, 2, 2)
    reference = decode(decoder, z, mode="full")
    decoder_bf16 = small_decoder().to(torch.bfloat16)
    out = decode(decoder_bf16, z, mode="full")  # fp32 latents are cast at the entrance
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
        decode(decoder, z, **options)


def test_compiled_decoder_decodes_the_same_video():
    decoder = small_decoder(num_res_blocks=(0, 0, 0, 0, 2))  # two ResBlocks of one shape: one compiled graph
    z = latents(2, 2, 3)
    with torch.no_grad():
        eager = decode(decoder, z, mode="full")
        compiled = decode(decoder.compile_blocks(), z, mode="full")
    assert all("_residual" in vars(block) for block in decoder.blocks[0][1:])  # compiled per instance
    # Inductor reorders fp32 sums: equal to rounding, not bit for bit.
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_the_network_is_the_full_decode(decoder):
    """Decoder.forward is the network alone: decode's full mode is that pass, in float32."""
    z = latents(3, 2, 3)
    with torch.no_grad():
        assert torch.equal(decode(decoder, z, mode="full"), decoder(z).float())
    with pytest.raises(TypeError):
        decoder(z, mode="full")  # decode options belong to `decode`, not to the network


# ---------------------------------------------------------------------------------------------------------------
# The stream state and its cross-rank variant


def stateful_modules(decoder: Decoder) -> tuple[list, list, list]:
    """(causal convolutions with a time kernel, attention layers, depth-to-space-time layers) of a decoder."""
    convs = [m for m in decoder.modules() if isinstance(m, CausalConv3d) and m.kernel_size[0] > 1]
    attns = [m for m in decoder.modules() if isinstance(m, CausalTemporalAttention)]
    d2sts = [m for m in decoder.modules() if isinstance(m, DepthToSpaceTime)]
    return convs, attns, d2sts


def test_stream_state_holds_what_each_module_set():
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    convs, attns, d2sts = stateful_modules(decoder)
    assert convs and attns and d2sts
    state = StreamState()
    assert all(state.conv_frames(m) is None for m in convs)  # fresh: the start of the video
    assert all(state.attention_kv(m) is None for m in attns)
    assert not any(state.started(m) for m in d2sts) and state.nbytes == 0
    with torch.no_grad():
        first = decoder(latents(2, 3, 3), state)
    assert first.shape[2] == decoder.config.num_frames(2)  # the first chunk drops its leading frames
    for conv in convs:  # the last k_t - 1 padded input frames of each convolution
        frames = state.conv_frames(conv)
        assert frames.shape[1:3] == (conv.in_channels, conv.kernel_size[0] - 1)
    for attn in attns:  # keys and values of both frames so far at this level
        keys, values = state.attention_kv(attn)
        assert keys.shape == values.shape and keys.shape[2] >= 2
    assert all(state.started(m) for m in d2sts)
    with torch.no_grad():
        later = decoder(latents(2, 3, 3, seed=1), state)
    assert later.shape[2] == 2 * decoder.config.temporal_factor  # a later chunk keeps all its frames


class Mailbox:
    """In-process stand-in for the ranks' point-to-point messages: one FIFO per (source, destination)."""

    def __init__(self):
        self.queues: dict[tuple[int, int], list[torch.Tensor]] = {}

    def link(self, rank: int) -> Link:
        return Link(self, rank)


class Link:
    """Rank `rank`'s end of a Mailbox (the Transport a RankBoundaryState takes)."""

    def __init__(self, box: Mailbox, rank: int):
        self.box, self.rank = box, rank

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.box.queues.setdefault((self.rank, dst), []).append(tensor.clone())

    def recv(self, src: int) -> torch.Tensor:
        return self.box.queues[(src, self.rank)].pop(0)

    def wait(self) -> None:
        pass


def test_rank_boundary_state_receives_only_state_it_lacks():
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    (conv, *_), (attn, *_), (d2st, *_) = stateful_modules(decoder)
    box = Mailbox()
    sent = [torch.full((1, 2), float(i)) for i in range(3)]
    for t in sent:
        Link(box, 0).send(t, 1)
    first = RankBoundaryState(None, 1, Link(box, 0))
    assert first.conv_frames(conv) is None and first.attention_kv(attn) is None  # the first slice has no past
    assert not first.started(d2st) and first.received == 0
    later = RankBoundaryState(0, None, Link(box, 1))
    assert later.started(d2st) and later.received == 0  # an earlier slice started the video: no message needed
    assert torch.equal(later.conv_frames(conv), sent[0]) and later.received == 1  # lacking: received
    assert torch.equal(later.conv_frames(conv), sent[0]) and later.received == 1  # held now: not received again
    keys, values = later.attention_kv(attn)
    assert torch.equal(keys, sent[1]) and torch.equal(values, sent[2]) and later.received == 3
    later.set_conv_frames(conv, torch.zeros(1, 2))  # the last rank sends nothing
    assert not any(box.queues.values())
    with pytest.raises(RuntimeError, match="twice"):
        later.set_conv_frames(conv, torch.zeros(1, 2))


@pytest.mark.parametrize("slices", [[(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 5)]])
def test_rank_boundary_states_chain_slices_into_the_full_decode(slices):
    """Each slice decoded on its own with a RankBoundaryState (messages through a mailbox) gives the full video;
    every later slice receives each convolution's frames and each attention's keys and values exactly once."""
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    convs, attns, _ = stateful_modules(decoder)
    z = latents(5, 3, 3)
    box, pieces, states = Mailbox(), [], []
    with torch.no_grad():
        for r, (t0, t1) in enumerate(slices):
            prev, nxt = (r - 1 if r else None), (r + 1 if r < len(slices) - 1 else None)
            states.append(RankBoundaryState(prev, nxt, box.link(r)))
            pieces.append(decoder(z[:, :, t0:t1], states[-1], step=None))
            states[-1].finish()
        full = decoder(z, step=None)
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=0)
    assert [s.received for s in states] == [0] + [len(convs) + 2 * len(attns)] * (len(slices) - 1)
    assert not any(box.queues.values())  # every message sent was received
    with torch.no_grad(), pytest.raises(RuntimeError, match="step=None"):  # stepping would send non-final states
        decoder(z[:, :, :3], RankBoundaryState(None, 1, Mailbox().link(0)), step=1)


def _split_rank(rank: int, port: int, out: str, cases: dict) -> None:
    """One forked rank of a 2-rank gloo group: decode every case with `group`, save, and never return into pytest."""
    code = 0
    try:
        import os

        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        decoder = small_decoder(has_attention=(True, False, True, False, True))
        with torch.no_grad():
            got = {
                name: decode(decoder, latents(t, 3, 4), group=dist.group.WORLD, **o) for name, (t, o) in cases.items()
            }
        torch.save(got, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    import os

    os._exit(code)


def test_decode_with_a_group_splits_time_across_ranks(tmp_path):
    """decode(..., group=...) over 2 gloo processes: every rank returns the whole video, equal to one process."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = {
        "auto": (5, {}),
        "one-frame": (1, {"mode": "full"}),  # fewer frames than ranks: rank 1 only gathers
        "streaming": (3, {"mode": "streaming", "frames_per_chunk": 1}),  # each slice whole: the chunk does not apply
        "tiled": (5, {"mode": "tiled", "tiles": (1, 2), "overlap": 1}),
    }
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_split_rank, args=(r, port, str(tmp_path), cases)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    decoder = small_decoder(has_attention=(True, False, True, False, True))
    with torch.no_grad():
        for name, (t, options) in cases.items():
            options = {"mode": "full"} if options.get("mode") in (None, "streaming") else options
            want = decode(decoder, latents(t, 3, 4), **options)
            assert torch.equal(ranks[0][name], ranks[1][name])
            torch.testing.assert_close(ranks[0][name], want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# One plan search


def test_one_plan_search_for_one_process_and_the_time_split():
    """plan_decode plans the time split too (ranks > 1): the same search with per-rank cost terms (a rank's slice in
    one pass, so no chunks; the gathered video twice). On one budget, one process streams in chunks, 4 ranks each
    decode their slice whole, 2 ranks need tiles; on a budget too small for a whole slice only one process fits."""
    cfg = DecoderConfig()
    shape = (1, 12, 28, 60, 106)  # 163 frames at 480x848
    budget = 12 * 2**30
    single, split4, split2 = (plan_decode(cfg, shape, torch.bfloat16, budget, ranks=r) for r in (1, 4, 2))
    assert (single.ranks, single.tiles) == (1, (1, 1)) and 1 < single.frames_per_chunk < 28
    assert (split4.ranks, split4.tiles, split4.frames_per_chunk) == (4, (1, 1), None)  # 7 latent frames per rank
    assert (split2.ranks, split2.frames_per_chunk) == (2, None) and split2.tiles != (1, 1)  # 14 per rank: tiles
    assert video_bytes(cfg, shape, 4) == 2 * output_bytes(cfg, shape)  # the gathered slices, then the joined video
    for plan in (single, split4, split2):
        assert video_bytes(cfg, shape, plan.ranks) < plan.estimated_bytes <= budget
    small = int(1.5 * 2**30)
    assert plan_decode(cfg, shape, torch.bfloat16, small).frames_per_chunk is not None
    with pytest.raises(MemoryError, match=r"too small .* smallest plan .* at once on each of 4 ranks.* use more ranks"):
        plan_decode(cfg, shape, torch.bfloat16, small, ranks=4)
