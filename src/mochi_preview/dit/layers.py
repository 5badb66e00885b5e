"""AsymmDiT building blocks: norms, SwiGLU, timestep and caption embedders, final layer.

Precision: every norm is computed in fp32 and cast back to its input's dtype; linears take their input's dtype and
multiply as a GPU does in bf16 (exact products, fp32 accumulation, one rounding of the output).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

HALF = (torch.bfloat16, torch.float16)
CPU_HALF_PATHS = ("auto", "native", "upcast")  # MOCHI_CPU_HALF: how half inputs are multiplied on a CPU
# CPU instructions that multiply each half format natively (x86 flags; "bf16" is the aarch64 feature).
NATIVE_HALF_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags every core of this CPU has (/proc/cpuinfo `flags` or `Features`); empty elsewhere."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return frozenset()
    fields = (line.partition(":") for line in lines)
    cores = [set(value.split()) for key, _, value in fields if key.strip() in ("flags", "Features")]
    return frozenset(set.intersection(*cores)) if cores else frozenset()


@torch.compiler.assume_constant_result  # compiled blocks take it as a constant (no graph break, no guard)
def cpu_half_path(dtype: torch.dtype) -> str:
    """How a CPU multiplies `dtype` inputs in this process: "native" (in `dtype`) or "upcast" (in fp32)."""
    return decide_cpu_half_path(dtype)


@functools.cache
def decide_cpu_half_path(dtype: torch.dtype) -> str:
    """`cpu_half_path`, decided at the first call and kept for the process (`cache_clear()` decides again).

    "native" where the CPU has instructions for that format (NATIVE_HALF_FLAGS) and PyTorch has oneDNN to use them;
    the environment variable MOCHI_CPU_HALF=native|upcast overrides. Decided from the machine, not by timing, so
    one machine always takes one path and a seed always gives the same numbers there.
    """
    if dtype not in HALF:
        return "native"
    choice = os.environ.get("MOCHI_CPU_HALF", "auto")
    if choice not in CPU_HALF_PATHS:
        raise ValueError(f"MOCHI_CPU_HALF must be one of {', '.join(CPU_HALF_PATHS)}; got {choice!r}")
    if choice != "auto":
        return choice
    native = torch.backends.mkldnn.is_available() and NATIVE_HALF_FLAGS[dtype] & cpu_flags()
    return "native" if native else "upcast"


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to multiply `dtype` inputs in on `device`: `dtype` itself, except half inputs on an "upcast" CPU.

    A tensor core multiplies bf16/fp16 inputs exactly, accumulates in fp32 and rounds the output once; so do CPUs
    with bf16 (fp16) instructions, through oneDNN. CPUs without them run half matmuls ~6-10x slower than fp32, so
    there (`cpu_half_path`) the inputs are upcast (exactly) and multiplied in fp32: the same numbers up to summation
    order, at the fp32 rate. Cast the result back to `dtype`.
    """
    if dtype in HALF and torch.device(device).type == "cpu" and cpu_half_path(dtype) == "upcast":
        return torch.float32
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with a GPU's half-precision semantics on every device (see `compute_dtype`); returns x's dtype."""
    dtype = compute_dtype(x.dtype, x.device)
    out = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return out.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32 (callers scale it, then cast back to their dtype)."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def modulated_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rms_norm(x) * (1 + scale), no learned weight; `scale` (B, D) broadcasts over tokens, (B, N, D) is per token."""
    scale = scale[:, None, :] if scale.ndim == 2 else scale  # (B, 1, D) or (B, N, D)
    return (rms_norm(x, eps) * (1.0 + scale.float())).to(x.dtype)


def residual_gated_rms_norm(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6):
    """x + tanh(gate) * rms_norm(branch): the sandwich norm closing each residual branch; `gate` (B, D), or
    (B, N, D) per token."""
    gate = gate[:, None, :] if gate.ndim == 2 else gate  # (B, 1, D) or (B, N, D)
    # tanh is taken in the gate's own dtype (bf16 in practice), as the reference does under autocast.
    return x + (rms_norm(branch, eps) * torch.tanh(gate)).to(x.dtype)


class RMSNorm(nn.Module):
    """rms_norm times a learned weight (the QK norms; the weight is kept fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, self.eps) * self.weight.float()).to(x.dtype)


def swiglu_hidden_size(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
    """Native SwiGLU width: 2/3 of dim * mlp_ratio, rounded up to a multiple of 256 (3072 -> 8192, 1536 -> 4096)."""
    hidden = int(2 * int(dim * mlp_ratio) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(a) * g) with [a | g] = w1(x); SiLU on the first half (diffusers swaps the halves)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, 2 * hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * g)


def timestep_features(sigma: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t = 1000 * (1 - sigma), cosine half first, in fp32: (B,) -> (B, dim)."""
    t = (1.0 - sigma.float()) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=sigma.device) * (-math.log(max_period) / half))
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """sigma -> sinusoidal features -> MLP(Linear, SiLU, Linear)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(sigma, self.freq_dim)  # (B, 256) fp32
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D)


class AttentionPool(nn.Module):
    """Pools T5 tokens into one vector: the masked mean queries all valid tokens (and itself)."""

    def __init__(self, text_dim: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_kv = Linear(text_dim, 2 * text_dim)
        self.to_q = Linear(text_dim, text_dim)
        self.to_out = Linear(text_dim, out_dim)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Masked mean in fp32, the mask divided first; an all-padding prompt pools to zeros.
        m = mask.float()
        m = m / m.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, L)
        pooled = (feats.float() * m[:, :, None]).sum(dim=1, keepdim=True)  # (B, 1, Dt)
        seq = torch.cat([pooled, feats.float()], dim=1).to(self.to_kv.weight.dtype)  # (B, 1+L, Dt)
        keep = F.pad(mask.bool(), (1, 0), value=True)  # (B, 1+L): the pooled token is always attendable

        k, v = rearrange(self.to_kv(seq), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        q = rearrange(self.to_q(seq[:, :1]), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, 1, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, H, 1, d)
        return self.to_out(rearrange(out, "b h 1 d -> b (h d)"))  # (B, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by [shift, scale] from c, then a linear to patch pixels."""

    def __init__(self, dim: int, out_features: int):
        super().__init__()
        self.mod = Linear(dim, 2 * dim)
        self.linear = Linear(dim, out_features)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), c_act (B, D); or c_act (B, T, D) one per latent frame, with `frames` (N,) each token's."""
        mod = self.mod(c_act)  # (B, 2 D)
        mod = mod[:, None] if frames is None else mod[:, frames]  # (B, 1, 2 D), or (B, N, 2 D) per token
        shift, scale = mod.float().chunk(2, dim=-1)  # (B, 1 or N, D) each
        x = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1.0 + scale) + shift
        return self.linear(x.to(self.linear.weight.dtype))  # (B, N, p*p*C)
