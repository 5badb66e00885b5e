"""Decoding latents into video: every mode, its memory plan, and the time split across ranks. `decode` is the entry.

* full: the network on the whole latent at once.
* streaming: latent frames go through in chunks; each causal convolution keeps its last k_t - 1 input frames in a
  `StreamState` and uses them as the next chunk's front padding, and depth-to-space-time drops its st - 1 frames on the
  first chunk only. This is the same computation as the full decode (equal within float rounding), with activation
  memory proportional to the chunk instead of the video.
* tiled: overlapping latent tiles (any number along each axis, every neighbouring pair sharing `overlap` latent
  pixels) are decoded on their own and cross-faded linearly over the shared region (weights k/(n+1) and
  1 - k/(n+1) across the n = overlap * 8 shared output pixels, which sum to 1), so there is no seam. Each tile sees
  the whole time axis, or streams through it when `frames_per_chunk` is given.
* auto: the least tiling whose estimated peak memory fits a budget (by default 80% of the free memory of the device),
  preferring exact streaming over spatial tiles, and the largest chunk that fits (`plan_decode`).
* time split (`group`, a torch.distributed process group): rank r decodes a contiguous slice of the latent frames,
  starting from the state the previous rank's slice ends with (a `RankBoundaryState`: received layer by layer while
  all ranks compute), and every rank gets the whole video (all-gather). Equal to the single-process decode. Each
  slice goes through the network in one call: streaming inside a slice would make each rank wait for the one before,
  so `frames_per_chunk` does not apply; "auto" plans with the same search, for the smallest budget of the ranks
  (one all-reduce), so every rank picks the same tiles: the tiles shape what the ranks exchange.

Every level of the network runs a few of its frames at a time at inference (`layers.frames_per_step`: about
STEP_ELEMENTS values per step), writing each result over its input (Decoder.forward): the same numbers, with one copy
of each level's activation alive plus one step's intermediates. Memory estimate (`estimate_decode_bytes`), per tile
and chunk, in bytes of the compute dtype, with L the whole activation (B, C, T, H, W) at a level and X one step of it,
padded (B, C, step + 2, H + 2, W + 2):
* a ResBlock peaks at L + RESBLOCK_FACTOR * X (the step's input kept for the residual, its normalized and padded
  copies, the convolution output and reordered copies, the allocator's slack) plus twice the 3x3x3 weight
  (reordered on each call); an attention block at L + ATTENTION_FACTOR * X plus its keys and values;
* an upsampling block at L + Y + two steps of Y, with Y its output (projection and depth-to-space copy per step);
* streaming adds the convolution caches (two padded frames per convolution);
* on top come the float32 output video (twice in the time split: the gathered slices and the joined video), two
  float32 copies of a decoded tile chunk (the cross-fade) and a fixed FIXED_OVERHEAD for scratch buffers.
Known gap: a time-split slice runs its levels without stepping (see RankBoundaryState), while the estimate assumes
stepping, so plans for ranks > 1 underestimate the activations of large slices.
The factors come from peak RSS measured on CPU (oneDNN convolutions, fp32, glibc malloc), rounded up so the estimate
errs high; see bench/RESULTS.md. On CUDA the caching allocator and cuDNN workspaces differ; the 80% default budget
leaves room for that.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .layers import frames_per_step
from .stream import P2PTransport, RankBoundaryState, StreamState

if TYPE_CHECKING:  # annotations only: the model does not depend on this module
    from .model import Decoder, DecoderConfig

RESBLOCK_FACTOR = 8.0
ATTENTION_FACTOR = 12.0
DEFAULT_BUDGET_FRACTION = 0.8
MODES = ("auto", "full", "streaming", "tiled")
TILE_SIZE = 32  # latent pixels per tile in mode "tiled" when no tile counts are given
FIXED_OVERHEAD = 160 * 2**20  # scratch buffers and allocator slack measured on top of the activations (CPU)


@dataclass(frozen=True)
class DecodePlan:
    """How to decode: latent frames per chunk (None: all at once), tiles along (height, width), overlap, the estimated
    peak bytes (0 when not planned for memory), and the ranks the time axis is split across (1: one process)."""

    frames_per_chunk: int | None
    tiles: tuple[int, int]
    overlap: int
    estimated_bytes: int
    ranks: int = 1


def decode(
    decoder: Decoder,
    z: torch.Tensor,
    mode: str = "auto",
    *,
    frames_per_chunk: int | None = None,
    tiles: tuple[int, int] | None = None,
    overlap: int = 8,
    memory_budget: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Raw VAE-space latents (B, 12, T, H, W) -> float32 video (B, 3, 6T - 5, 8H, 8W), before any clamping.

    mode "full": all at once. "streaming": `frames_per_chunk` latent frames at a time (default 1), equal to full.
    "tiled": `tiles` = (rows, cols) overlapping by `overlap` latent pixels (default: tiles of at most 32 latent
    pixels), each streamed through time if `frames_per_chunk` is set.
    "auto": chosen by `plan_decode` for `memory_budget` bytes (default: 80% of the device's free memory).
    `group`: split the latent frames across the ranks of this process group (z the same on every rank); every rank
    returns the whole video. Each rank's slice is decoded whole ("full" and "streaming" alike; `frames_per_chunk` is
    not used), in `tiles` for "tiled", in the fewest tiles that fit for "auto", planned for the smallest of the
    ranks' budgets (every rank must pick the same tiles). A group of one rank is a plain decode.
    """
    cfg = decoder.config
    check_latents(z, cfg)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if memory_budget is not None and mode != "auto":
        raise ValueError(f"memory_budget only applies to mode 'auto', not {mode!r}")
    if mode == "full" and (frames_per_chunk is not None or tiles is not None):
        raise ValueError("mode 'full' takes no frames_per_chunk or tiles; use 'streaming' or 'tiled'")
    if mode == "streaming" and tiles is not None:
        raise ValueError("mode 'streaming' takes no tiles; use mode 'tiled' with frames_per_chunk to combine")
    if mode == "auto" and (frames_per_chunk is not None or tiles is not None):
        raise ValueError("mode 'auto' chooses frames_per_chunk and tiles; pass a memory_budget instead")
    if frames_per_chunk is not None and frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be at least 1, not {frames_per_chunk}")
    ranks = dist.get_world_size(group) if group is not None else 1
    if ranks > 1:
        frames_per_chunk = None  # each rank decodes its slice in one pass
    elif mode == "streaming" and frames_per_chunk is None:
        frames_per_chunk = 1
    if mode == "auto":
        device = decoder.output_proj.weight.device
        budget = memory_budget if memory_budget is not None else int(DEFAULT_BUDGET_FRACTION * free_memory(device))
        if ranks > 1:  # free memory differs between ranks: plan once, for the tightest, on every rank
            budget = min_over_ranks(budget, group, device)
        plan = plan_decode(cfg, tuple(z.shape), decoder.output_proj.weight.dtype, budget, overlap, ranks=ranks)
    else:
        if mode == "tiled":
            tiles = tuple(tiles) if tiles is not None else default_tiles(z.shape[3:], overlap)
        plan = DecodePlan(frames_per_chunk, tiles or (1, 1), overlap, 0, ranks)
    return run_time_split(decoder, z, plan, group) if ranks > 1 else run_plan(decoder, z, plan)


def min_over_ranks(value: int, group: dist.ProcessGroup, device: torch.device) -> int:
    """The smallest of the ranks' `value`s, on every rank of `group` (one all-reduce; on `device` for NCCL)."""
    on = torch.device("cpu") if "gloo" in str(dist.get_backend(group)) else device  # gloo serves CPU tensors
    t = torch.tensor([value], dtype=torch.int64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def default_tiles(size: tuple[int, int], overlap: int) -> tuple[int, int]:
    """Tile counts giving tiles of at most TILE_SIZE latent pixels (256 video pixels, as diffusers' default)."""
    return tuple(max(1, -(-(n - overlap) // max(TILE_SIZE - overlap, 1))) for n in size)


def check_latents(z: torch.Tensor, cfg: DecoderConfig) -> None:
    if z.ndim != 5 or z.shape[1] != cfg.latent_dim or min(z.shape[2:]) < 1:
        raise ValueError(
            f"the decoder takes raw VAE latents shaped (B, {cfg.latent_dim}, T, H, W) with T, H, W >= 1 "
            f"(denormalize DiT latents first); got shape {tuple(z.shape)}"
        )


def run_plan(decoder: Decoder, z: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """Decode in one process, tile by tile, each tile chunk by chunk, cross-fading tiles into one float32 output."""
    cfg = decoder.config
    b, _, t, h, w = z.shape
    s = cfg.spatial_factor
    if plan.ranks != 1:
        raise ValueError(f"a plan for {plan.ranks} ranks runs with run_time_split")
    if plan.frames_per_chunk is not None and plan.frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be at least 1, not {plan.frames_per_chunk}")
    device = decoder.output_proj.weight.device
    tiles = list(tile_weights(h, w, plan, s, device))  # checks the grid before any work
    if plan.tiles == (1, 1) and plan.frames_per_chunk is None:
        return decoder(z.to(device)).float()  # full: no output buffer to assemble
    video = torch.zeros(b, cfg.out_channels, cfg.num_frames(t), h * s, w * s, device=device)
    step = plan.frames_per_chunk or t
    for (h0, h1), (w0, w1), weight in tiles:
        state = StreamState() if plan.frames_per_chunk is not None else None
        f0 = 0
        for t0 in range(0, t, step):
            x = decoder(z[:, :, t0 : t0 + step, h0:h1, w0:w1].to(device), state)
            f1 = f0 + x.shape[2]
            video[:, :, f0:f1, h0 * s : h1 * s, w0 * s : w1 * s].addcmul_(x, weight)  # (B, 3, f, h, w)
            f0 = f1
    return video


def run_time_split(decoder: Decoder, z: torch.Tensor, plan: DecodePlan, group: dist.ProcessGroup) -> torch.Tensor:
    """Decode rank `r`'s slice of the latent frames (`time_slices`), each tile a causal chain from the previous rank
    to the next, then all-gather: the whole float32 video on every rank (with T < ranks, the last ranks only gather).
    """
    cfg = decoder.config
    b, _, t, h, w = z.shape
    s = cfg.spatial_factor
    rank, ranks = dist.get_rank(group), dist.get_process_group_ranks(group)
    if plan.ranks != len(ranks) or plan.frames_per_chunk is not None:
        raise ValueError(f"a time split over {len(ranks)} ranks needs a plan for them without chunks, not {plan}")
    device = decoder.output_proj.weight.device
    tiles = list(tile_weights(h, w, plan, s, device))
    slices = time_slices(t, len(ranks))
    counts = slice_frames(cfg, slices)
    mine = torch.zeros(b, cfg.out_channels, max(counts), h * s, w * s, device=device)  # padded to the largest
    if rank < len(slices):
        (t0, t1), last = slices[rank], rank == len(slices) - 1
        transport = P2PTransport(device)
        for (h0, h1), (w0, w1), weight in tiles:
            state = RankBoundaryState(ranks[rank - 1] if rank else None, None if last else ranks[rank + 1], transport)
            # step=None: each module sets its state once per slice, and that is what the next rank receives.
            x = decoder(z[:, :, t0:t1, h0:h1, w0:w1].to(device), state, step=None)
            mine[:, :, : x.shape[2], h0 * s : h1 * s, w0 * s : w1 * s].addcmul_(x, weight)
            state.finish()
    parts = [torch.empty_like(mine) for _ in ranks]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([part[:, :, :n] for part, n in zip(parts, counts)], dim=2)


def time_slices(frames: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous latent-frame slices, sizes within one, the larger first; at most one slice per frame."""
    n = min(frames, ranks)
    size, extra = divmod(frames, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def slice_frames(cfg: DecoderConfig, slices: list[tuple[int, int]]) -> list[int]:
    """Video frames per slice: the first makes num_frames(t1) frames, a later one temporal_factor * (t1 - t0)."""
    return [cfg.num_frames(t1) - (cfg.num_frames(t0) if t0 else 0) for t0, t1 in slices]


def tile_weights(
    h: int, w: int, plan: DecodePlan, scale: int, device
) -> Iterator[tuple[tuple[int, int], tuple[int, int], torch.Tensor]]:
    """Per tile of the plan's grid: its latent rows, its latent columns and its output-pixel blend weights."""
    rows = tile_spans(h, plan.tiles[0], plan.overlap, "height")
    cols = tile_spans(w, plan.tiles[1], plan.overlap, "width")
    for span_h, ramp_h in zip(rows, blend_ramps(rows, scale, plan.overlap, device)):
        for span_w, ramp_w in zip(cols, blend_ramps(cols, scale, plan.overlap, device)):
            yield span_h, span_w, ramp_h[:, None] * ramp_w[None, :]  # (h_tile * s, w_tile * s)


def tile_spans(length: int, count: int, overlap: int, axis: str = "axis") -> list[tuple[int, int]]:
    """`count` tiles covering [0, length) whose neighbours share exactly `overlap` positions, sizes within 1."""
    if count < 1 or overlap < 0:
        raise ValueError(f"tiles along {axis} must be >= 1 and overlap >= 0; got {count} tiles, overlap {overlap}")
    if count == 1:
        return [(0, length)]
    size, extra = divmod(length + (count - 1) * overlap, count)
    spans, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        spans.append((start, end))
        start = end - overlap
    # A middle tile fades in and out over `overlap` each; edge tiles only once.
    needed = [overlap * ((i > 0) + (i < count - 1)) for i in range(count)]
    if any(e - s0 < max(n, 1) for (s0, e), n in zip(spans, needed)) or spans[-1][1] != length:
        raise ValueError(
            f"{count} tiles with overlap {overlap} do not fit a {axis} of {length} latent pixels: every tile must "
            f"be at least twice the overlap; use fewer tiles or a smaller overlap"
        )
    return spans


def blend_ramps(spans: list[tuple[int, int]], scale: int, overlap: int, device) -> list[torch.Tensor]:
    """Per tile, output-pixel weights along one axis: 1 inside, linear fades over the shared regions."""
    n = overlap * scale
    fade_in = torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
    ramps = []
    for i, (start, end) in enumerate(spans):
        ramp = torch.ones((end - start) * scale, device=device)
        if i > 0 and n:
            ramp[:n] = fade_in
        if i < len(spans) - 1 and n:
            ramp[-n:] = 1 - fade_in
        ramps.append(ramp)
    return ramps


# ---------------------------------------------------------------------------------------------------------------
# Memory estimate and automatic plan


def estimate_decode_bytes(
    cfg: DecoderConfig,
    batch: int,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    streaming: bool,
    total_frames: int | None = None,
) -> int:
    """Estimated peak activation bytes to decode one (chunk of a) tile of `frames` x `height` x `width` latents.

    Excludes the weights and the output video. `total_frames` (latent) sizes the attention caches when streaming.
    """
    e = torch.empty((), dtype=dtype).element_size()
    widths = cfg.channels[::-1]  # latent side first
    blocks, attention = cfg.num_res_blocks[::-1], cfg.has_attention[::-1]
    expansions = list(zip(cfg.temporal_expansions[::-1], cfg.spatial_expansions[::-1]))
    # (width, ResBlocks, attention, upsampling after them) for blocks.0, each upsampling block, the last stack
    levels = [(widths[0], blocks[0], attention[0], None)]
    levels += [(widths[i - 1], blocks[i], attention[i], (*expansions[i - 1], widths[i])) for i in range(1, len(widths))]
    levels += [(widths[-1], blocks[-1], attention[-1], None)]
    t, h, w = frames, height, width
    total_t = total_frames or frames
    peak, caches = 0.0, 0.0
    for c, n, attn, up in levels:
        level = batch * c * t * h * w * e  # this level's whole activation, updated in place step by step
        step = min(frames_per_step(batch * c * h * w), t)
        x = batch * c * (step + 2) * (h + 2) * (w + 2) * e  # one step of it, padded
        if n:
            weights = 2 * c * c * 27 * e  # the convolution's weight, reordered for the kernel on each call
            peak = max(peak, level + (ATTENTION_FACTOR if attn else RESBLOCK_FACTOR) * x + weights)
        if streaming:
            caches += n * 2 * batch * c * 2 * (h + 2) * (w + 2) * e  # two convs, two padded frames each
        if attn:  # keys and values of every frame so far, whether streaming or stepping
            caches += n * 2 * batch * c * total_t * h * w * e
        if up is not None:
            st, s, c_next = up
            t = t * st if streaming else (t - 1) * st + 1
            total_t = (total_t - 1) * st + 1
            h, w = h * s, w * s
            out_step = batch * c_next * step * st * h * w * e  # one step's projection and its depth-to-space copy
            peak = max(peak, level + batch * c_next * t * h * w * e + 2 * out_step)
    tile_out = 2 * batch * cfg.out_channels * t * h * w * 4
    return int(peak + caches + tile_out + FIXED_OVERHEAD)


def output_bytes(cfg: DecoderConfig, shape: tuple[int, ...]) -> int:
    """Bytes of the float32 video decoded from latents of `shape`."""
    b, _, t, h, w = shape
    return 4 * b * cfg.out_channels * cfg.num_frames(t) * h * w * cfg.spatial_factor**2


def video_bytes(cfg: DecoderConfig, shape: tuple[int, ...], ranks: int = 1) -> int:
    """Bytes of float32 video one process holds at the peak: the video, twice in a time split over `ranks` (the
    gathered slices, then the video they are joined into)."""
    return (1 if ranks == 1 else 2) * output_bytes(cfg, shape)


def plan_decode(
    cfg: DecoderConfig, shape: tuple[int, ...], dtype: torch.dtype, budget: int, overlap: int = 8, ranks: int = 1
) -> DecodePlan:
    """The least tiling that fits `budget` bytes (activations and output video), then the largest chunk.

    One search for one process and for the time split across `ranks` (decode's `group`); they differ in their cost
    terms only: a rank decodes the longest slice of the latent frames (`time_slices`) in one pass, so there is no
    chunk to choose, and holds the gathered video (`video_bytes`). The plan's bytes are then per rank.
    """
    b, _, t, h, w = shape
    frames = max(t1 - t0 for t0, t1 in time_slices(t, ranks))  # latent frames one process decodes
    video = video_bytes(cfg, shape, ranks)
    least = 1 if ranks == 1 else None  # the smallest chunk: one latent frame, or a rank's whole slice

    def cost(chunk: int | None, grid: tuple[int, int]) -> int:
        th = max(e - s for s, e in tile_spans(h, grid[0], overlap))
        tw = max(e - s for s, e in tile_spans(w, grid[1], overlap))
        return video + estimate_decode_bytes(cfg, b, chunk or frames, th, tw, dtype, chunk is not None, t)

    grids = []
    for rows in range(1, h + 1):
        for cols in range(1, w + 1):
            try:
                area = max(e - s for s, e in tile_spans(h, rows, overlap)) * max(
                    e - s for s, e in tile_spans(w, cols, overlap)
                )
            except ValueError:
                continue
            grids.append((rows * cols, area, (rows, cols)))
    grids.sort()
    smallest = min(grids, key=lambda g: cost(least, g[2]))[2]
    if cost(least, smallest) > budget:
        need = cost(least, smallest)
        how = "1 latent frame per chunk" if least else f"{frames} latent frames at once on each of {ranks} ranks"
        raise MemoryError(
            f"a memory budget of {budget / 2**30:.2f} GiB is too small to decode latents {tuple(shape)}: the "
            f"smallest plan ({smallest[0]}x{smallest[1]} tiles with overlap {overlap}, {how}) needs about "
            f"{need / 2**30:.2f} GiB, of which {video / 2**30:.2f} GiB is the output video"
            f"{' (gathered on every rank)' if ranks > 1 else ''}. Free memory, decode fewer frames, "
            f"{'use more ranks, ' if ranks > 1 else ''}or lower the overlap."
        )
    for _, _, grid in grids:
        if cost(least, grid) > budget:
            continue
        if cost(None, grid) <= budget:
            return DecodePlan(None, grid, overlap, cost(None, grid), ranks)
        lo, hi = 1, t  # largest chunk that fits: cost grows with the chunk (one process only: least is 1 here)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid, grid) <= budget else (lo, mid - 1)
        return DecodePlan(lo, grid, overlap, cost(lo, grid))
    raise AssertionError("unreachable: the smallest plan fits")


def free_memory(device: torch.device | str) -> int:
    """Bytes that can still be allocated on `device`.

    CUDA: free device memory plus the blocks PyTorch's allocator holds unused. CPU: MemAvailable, capped by the
    container's cgroup memory limit when there is one (a container sees the host's /proc/meminfo).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = _meminfo_available()
    limit = _cgroup_headroom()
    if available is None and limit is None:
        raise RuntimeError("cannot read the free memory of this machine; pass memory_budget (bytes) to the decoder")
    return min(x for x in (available, limit) if x is not None)


def _meminfo_available() -> int | None:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge v1 number: no limit
            return max(int(limit) - usage, 0)
    return None


def smaller_vae_options(options: dict, decoder: Decoder, shape: tuple[int, ...]) -> dict:
    """Decode options that need less memory than `options` for raw latents of `shape`, for a retry after running
    out: "auto" plans for half the memory of the plan it makes now; "full" streams one latent frame at a time;
    "streaming" and "tiled" go to the next tiling (more, smaller tiles where the size allows), one latent frame per
    chunk. When even the smallest auto plan does not fit, the next tiling is tried anyway (the estimate errs high).
    """
    mode = options.get("mode", "auto")
    overlap = options.get("overlap", 8)
    height, width = shape[3:]
    if mode == "full":
        return {"mode": "streaming", "frames_per_chunk": 1}
    if mode == "auto":
        device = next(decoder.parameters()).device
        budget = options.get("memory_budget") or int(DEFAULT_BUDGET_FRACTION * free_memory(device))
        try:
            plan = plan_decode(decoder.config, shape, next(decoder.parameters()).dtype, budget, overlap)
            return {**options, "memory_budget": min(budget, plan.estimated_bytes) // 2}
        except MemoryError:
            tiles = default_tiles((height, width), overlap)
    elif mode == "tiled" and options.get("tiles") is not None:
        tiles = tuple(options["tiles"])
    else:
        tiles = (1, 1) if mode == "streaming" else default_tiles((height, width), overlap)
    return {
        "mode": "tiled",
        "tiles": next_tiles(tiles, height, width, overlap),
        "overlap": overlap,
        "frames_per_chunk": 1,
    }


def next_tiles(tiles: tuple[int, int], height: int, width: int, overlap: int) -> tuple[int, int]:
    """The next finer tile grid of a latent (height, width) that still fits the overlap: twice the tiles along both
    axes, else one more along both, else along one; `tiles` itself when no finer grid fits."""
    rows, cols = tiles
    for grid in ((2 * rows, 2 * cols), (rows + 1, cols + 1), (2 * rows, cols), (rows, 2 * cols), (rows + 1, cols),
                 (rows, cols + 1)):  # fmt: skip
        try:
            tile_spans(height, grid[0], overlap)
            tile_spans(width, grid[1], overlap)
        except ValueError:
            continue
        return grid
    return (rows, cols)


def describe_vae_options(options: dict) -> str:
    """A decode plan in words, for messages: "auto (budget 1.50 GiB)", "tiled 2x2, 1 latent frame per chunk" ..."""
    mode = options.get("mode", "auto")
    parts = [mode]
    if options.get("memory_budget") is not None:
        parts[0] += f" (budget {options['memory_budget'] / 2**30:.2f} GiB)"
    if options.get("tiles") is not None:
        parts[0] += " {}x{}".format(*options["tiles"])
    if options.get("frames_per_chunk") is not None:
        n = options["frames_per_chunk"]
        parts.append(f"{n} latent frame{'s' if n != 1 else ''} per chunk")
    return ", ".join(parts)
