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

from .decode import check_latents
from .layers import CausalTemporalAttention, DepthToSpaceTime
from .model import Decoder

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER = 8  # int64 slots: [dtype index, ndim, *shape]


class BoundaryCache(dict):
    """The decoder's streaming cache for one rank's time slice: the earlier slices' state arrives from the previous
    rank (`prev`), this slice's final state goes to the next (`next`); both are global ranks or None."""

    def __init__(self, prev: int | None, next: int | None, device: torch.device):
        super().__init__()
        self.prev, self.next, self.device = prev, next, device
        self.pending: list = []  # sends in flight, with their buffers
        self.bytes_sent = 0

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
        self.bytes_sent += header.nbytes + t.nbytes

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


def decode_time_split(decoder: Decoder, z: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Raw VAE latents (B, 12, T, H, W), the same on every rank -> float32 video (B, 3, 6T - 5, 8H, 8W) on every
    rank, each rank decoding a slice of the latent frames (with T < ranks, the last ranks only gather)."""
    cfg = decoder.config
    check_latents(z, cfg)
    group = group or dist.group.WORLD
    rank, ranks = dist.get_rank(group), dist.get_process_group_ranks(group)
    device = decoder.output_proj.weight.device
    slices = time_slices(z.shape[2], len(ranks))
    # Video frames per slice: the first slice makes num_frames(t1) frames, a later one st * (t1 - t0) of them.
    counts = [cfg.num_frames(t1) - (cfg.num_frames(t0) if t0 else 0) for t0, t1 in slices]
    b, _, _, h, w = z.shape
    s = cfg.spatial_factor
    mine = torch.zeros(b, cfg.out_channels, max(counts), h * s, w * s, device=device)  # padded to the largest
    if rank < len(slices):
        (t0, t1), last = slices[rank], rank == len(slices) - 1
        cache = BoundaryCache(ranks[rank - 1] if rank else None, None if last else ranks[rank + 1], device)
        frames = decoder.forward_chunk(z[:, :, t0:t1].to(device), cache)  # (B, 3, counts[rank], 8H, 8W)
        mine[:, :, : frames.shape[2]] = frames
        cache.finish()
    parts = [torch.empty_like(mine) for _ in ranks]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([part[:, :, :n] for part, n in zip(parts, counts)], dim=2)
