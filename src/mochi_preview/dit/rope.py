"""Learned, mixed 3D rotary embedding: per-head frequencies mixing the (t, h, w) axes, interleaved rotation."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache

import torch


def _bin_centers(n: int, scale: float) -> torch.Tensor:
    """Centers of n equal bins over [-n*scale/2, n*scale/2], built as the reference does (fp32 linspace, CPU)."""
    half = n * scale / 2.0
    edges = torch.linspace(-half, half, n + 1, dtype=torch.float32)
    return (edges[:-1] + edges[1:]) / 2


@lru_cache(maxsize=8)
def rope_positions(frames: int, rows: int, cols: int, target_area: float = 36864.0) -> torch.Tensor:
    """(N, 3) fp32 positions (t, h, w) in token order; spatial axes rescaled so rows * cols covers `target_area`.

    The frame index is used as it is; rows and columns become bin centers at spacing sqrt(192^2 / (rows*cols)).
    Cached per grid and built on the CPU: callers move it to their device.
    """
    scale = math.sqrt(target_area / (rows * cols))
    with torch.inference_mode(False):  # cached: a tensor made in inference mode could never serve training
        t = torch.arange(frames, dtype=torch.float32)
        h = _bin_centers(rows, scale)
        w = _bin_centers(cols, scale)
        grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)  # (T, pH, pW, 3)
        return grid.reshape(-1, 3)


@contextmanager
def ieee_fp32_matmuls():
    """fp32 matmuls in full fp32 inside, whatever the caller set: no TF32 on CUDA, no bf16/TF32 in oneDNN on CPU.

    Reads and writes only the per-backend `fp32_precision` settings (reading the legacy `allow_tf32` raises once
    both APIs were used) and restores them on exit. The settings are process-wide: a matmul another thread runs
    meanwhile is also full fp32, which only makes it slower.
    """
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles theta[n, h, f] = sum_d pos[n, d] * freqs[d, h, f] -> (cos, sin), each (N, heads, head_dim/2) fp32.

    As the reference: an fp32 einsum with autocast off, whatever autocast or TF32 setting the caller runs under
    (under CPU bf16 autocast the einsum would run in bf16: at the 480x848 grid, cos/sin up to 0.54 off with the
    frequencies of issue 22's measurement, 1.2 off with N(0, 0.5) ones). The tables are fp32 in every case.
    """
    with torch.autocast(positions.device.type, enabled=False), ieee_fp32_matmuls():
        theta = torch.einsum("nd,dhf->nhf", positions.float(), freqs.float())
        return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2f, 2f+1) of x (B, N, heads, head_dim) by per-token, per-head angles (N, heads,
    head_dim/2); fp32 math, x's dtype out."""
    x32 = x.float().unflatten(-1, (-1, 2))  # (B, N, H, F, 2)
    x0, x1 = x32.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
