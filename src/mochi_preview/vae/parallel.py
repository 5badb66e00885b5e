"""VAE decoding split along time across the ranks of a process group, equal to the single-process decode.

Rank r decodes a contiguous slice of the latent frames. The decoder is causal, so a slice needs from the slices
before it only what the streaming decode keeps between time chunks: each causal convolution's last k_t - 1 input
frames (and an attention layer's past keys and values), and the fact that the video has started (depth-to-space-time
drops its leading frames on the first slice only). `BoundaryCache` is that streaming cache with its missing entries
received from rank r - 1 and its updates sent on to rank r + 1, layer by layer while all ranks compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .decode import (
    DEFAULT_BUDGET_FRACTION,
    MODES,
    blend_ramps,
    check_latents,
    default_tiles,
    estimate_decode_bytes,
    free_memory,
    output_bytes,
    tile_spans,
)
from .layers import CausalTemporalAttention, DepthToSpaceTime
from .model import Decoder, DecoderConfig

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER = 8  # int64 slots: [dtype index, ndim, *shape]


class BoundaryCache(dict):
    """The decoder's streaming cache for one rank's time slice: the earlier slices' state arrives from the previous
    rank (`prev`), this slice's final state goes to the next (`next`); both are global ranks or None."""

    def __init__(self, prev: int | None, next: int | None, device: torch.device):
        super().__init__()
        self.prev, self.next, self.device = prev, next, device
        self.pending: list = []  # sends in flight, with their buffers

    def __contains__(self, module) -> bool:
        return super().__contains__(module) or self.prev is not None  # not the first slice: every state exists

    def __getitem__(self, module):
        if super().__contains__(module):
            return super().__getitem__(module)
        if isinstance(module, CausalTemporalAttention):
            return self._recv(), self._recv()  # keys and values of all earlier frames
        return self._recv()  # a convolution's last k_t - 1 input frames

    def __setitem__(self, module, value) -> None:
        super().__setitem__(module, value)
        if self.next is not None and not isinstance(module, DepthToSpaceTime):  # its state is "started": implied
            for t in value if isinstance(value, tuple) else (value,):
                self._send(t)

    def _send(self, t: torch.Tensor) -> None:
        t = t.contiguous()
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        header[: 2 + t.ndim] = torch.tensor([DTYPES.index(t.dtype), t.ndim, *t.shape])
        for buf in (header, t):
            self.pending.append((dist.isend(buf, self.next), buf))  # keep buf alive until the send completes

    def _recv(self) -> torch.Tensor:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, self.prev)
        dtype, ndim, *shape = header.tolist()
        t = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=self.device)
        dist.recv(t, self.prev)
        return t

    def finish(self) -> None:
        """Wait for this rank's sends to be received."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def time_slices(frames: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous latent-frame slices, sizes within one, the larger first; at most one slice per frame."""
    n = min(frames, ranks)
    size, extra = divmod(frames, n)
    bounds = [0]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def decode_time_split(
    decoder: Decoder,
    z: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    mode: str = "auto",
    *,
    tiles: tuple[int, int] | None = None,
    overlap: int = 8,
    memory_budget: int | None = None,
    frames_per_chunk: int | None = None,
) -> torch.Tensor:
    """Raw VAE latents (B, 12, T, H, W), the same on every rank -> float32 video (B, 3, 6T - 5, 8H, 8W) on every
    rank, each rank decoding a slice of the latent frames (with T < ranks, the last ranks only gather).

    `mode` and options as `Decoder.forward`'s, applied to each rank's slice: "full" and "streaming" decode it whole
    (streaming inside a slice would make each rank wait for the one before; `frames_per_chunk` is ignored), "tiled"
    in `tiles` cross-faded over `overlap` latent pixels, "auto" in the fewest tiles whose estimated peak fits
    `memory_budget` bytes (default: 80% of the device's free memory). Each tile is its own causal chain.
    """
    cfg = decoder.config
    check_latents(z, cfg)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    group = group or dist.group.WORLD
    rank, ranks = dist.get_rank(group), dist.get_process_group_ranks(group)
    device, dtype = decoder.output_proj.weight.device, decoder.output_proj.weight.dtype
    b, _, t, h, w = z.shape
    slices = time_slices(t, len(ranks))
    if mode == "tiled":
        tiles = tuple(tiles) if tiles is not None else default_tiles((h, w), overlap)
    elif mode == "auto":
        budget = memory_budget if memory_budget is not None else int(DEFAULT_BUDGET_FRACTION * free_memory(device))
        longest = max(t1 - t0 for t0, t1 in slices)
        tiles = fewest_tiles(cfg, (b, cfg.latent_dim, longest, h, w), tuple(z.shape), dtype, budget, overlap)
    else:
        tiles = (1, 1)
    rows, cols = tile_spans(h, tiles[0], overlap, "height"), tile_spans(w, tiles[1], overlap, "width")

    # Video frames per slice: the first slice makes num_frames(t1) frames, a later one st * (t1 - t0) of them.
    counts = [cfg.num_frames(t1) - (cfg.num_frames(t0) if t0 else 0) for t0, t1 in slices]
    s = cfg.spatial_factor
    mine = torch.zeros(b, cfg.out_channels, max(counts), h * s, w * s, device=device)  # padded to the largest
    if rank < len(slices):
        (t0, t1), last = slices[rank], rank == len(slices) - 1
        for (h0, h1), ramp_h in zip(rows, blend_ramps(rows, s, overlap, device)):
            for (w0, w1), ramp_w in zip(cols, blend_ramps(cols, s, overlap, device)):
                cache = BoundaryCache(ranks[rank - 1] if rank else None, None if last else ranks[rank + 1], device)
                # step=None: BoundaryCache forwards every state a module sets to the next rank, one per module
                # and slice, so the levels run on the whole slice at once (not a few frames at a time).
                x = decoder.forward_chunk(z[:, :, t0:t1, h0:h1, w0:w1].to(device), cache, step=None)
                weight = ramp_h[:, None] * ramp_w[None, :]  # (h_tile * s, w_tile * s): ones for a single tile
                mine[:, :, : x.shape[2], h0 * s : h1 * s, w0 * s : w1 * s].addcmul_(x, weight)
                cache.finish()
    parts = [torch.empty_like(mine) for _ in ranks]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([part[:, :, :n] for part, n in zip(parts, counts)], dim=2)


def fewest_tiles(
    cfg: DecoderConfig, slice_shape: tuple, shape: tuple, dtype: torch.dtype, budget: int, overlap: int
) -> tuple[int, int]:
    """The fewest tiles (rows, cols) whose whole-slice decode fits `budget` with the gathered video (twice)."""
    b, _, t, h, w = slice_shape
    video = 2 * output_bytes(cfg, shape)  # the gathered parts, then the concatenated video
    for _, rows, cols in sorted((r * c, r, c) for r in range(1, h + 1) for c in range(1, w + 1)):
        try:
            th = max(e - s for s, e in tile_spans(h, rows, overlap))
            tw = max(e - s for s, e in tile_spans(w, cols, overlap))
        except ValueError:  # tiles narrower than twice the overlap
            continue
        if video + estimate_decode_bytes(cfg, b, t, th, tw, dtype, streaming=False) <= budget:
            return rows, cols
    raise MemoryError(
        f"a memory budget of {budget / 2**30:.2f} GiB is too small to decode {t} latent frames per rank of {shape} "
        "even in the smallest tiles: use more ranks, decode fewer frames, or lower the overlap"
    )
