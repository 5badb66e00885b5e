"""AsymmDiT building blocks: norms, SwiGLU, timestep and caption embedders, final layer.

Precision: every norm is computed in fp32 and cast back to its input's dtype; linears take their input's dtype and
multiply as a GPU does in bf16 (exact products, fp32 accumulation, one rounding of the output).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to multiply `dtype` inputs in on `device`: fp32 for half inputs on a CPU, else `dtype` itself.

    A tensor core multiplies bf16/fp16 inputs exactly, accumulates in fp32 and rounds the output once. CPUs without
    half-precision instructions run half matmuls ~10x slower than fp32, so there the inputs are upcast (exactly) and
    multiplied in fp32: the same numbers as a GPU up to summation order, at the fp32 rate. Cast the result back to
    `dtype`.
    """
    if torch.device(device).type == "cpu" and dtype in HALF:
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
    """rms_norm(x) * (1 + scale), no learned weight; `scale` (B, D) broadcasts over tokens."""
    return (rms_norm(x, eps) * (1.0 + scale.float()[:, None, :])).to(x.dtype)


def residual_gated_rms_norm(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6):
    """x + tanh(gate) * rms_norm(branch): the sandwich norm closing each residual branch; `gate` (B, D)."""
    # tanh is taken in the gate's own dtype (bf16 in practice), as the reference does under autocast.
    return x + (rms_norm(branch, eps) * torch.tanh(gate)[:, None, :]).to(x.dtype)


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

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(c_act).float().chunk(2, dim=-1)  # (B, D) each
        x = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1.0 + scale[:, None]) + shift[:, None]
        return self.linear(x.to(self.linear.weight.dtype))  # (B, N, p*p*C)
