"""FP8 weight storage for the DiT's blocks: half the bytes of bf16, computed in the usual dtype.

Each Linear of the 48 blocks (>99% of the parameters) keeps its weight as float8_e4m3fn (1 sign, 4 exponent,
3 mantissa bits; largest finite value 448) plus a fp32 scale, per tensor or per output row: weight ~= fp8 * scale.
The scale maps the largest |weight| to 448, so the whole fp8 range is used. Rounding to 3 mantissa bits costs at
most 2^-4 relative error per (normal) element; per-row scales keep small rows out of the subnormal range when rows
differ in magnitude. The forward dequantizes one layer at a time and multiplies as `linear` does: storage only,
no fp8 matmul (which needs Hopper/Ada tensor cores and would also quantize the activations). The bias stays in the
compute dtype. `.to(dtype)` on a model would upcast the fp8 weights too (they are floating point): move FP8 models
between devices only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import FP8_DTYPES
from .layers import Linear, compute_dtype, linear

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
GRANULARITIES = ("tensor", "channel")


def fp8_scale(weight: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """amax / 448 in fp32: () per tensor or (out, 1) per output channel; an all-zero tensor or row gets 1 (no 0/0)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    a = weight.float().abs()
    amax = a.amax() if granularity == "tensor" else a.amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / E4M3_MAX, 1.0)


def quantize_fp8(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (fp8 e4m3fn (out, in), fp32 scale () or (out, 1)) with weight ~= fp8 * scale."""
    scale = fp8_scale(weight, granularity)
    # The clamp catches w / scale landing a rounding step above 448 (e4m3fn has no inf: overflow is NaN or saturates).
    return (weight.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class FP8Linear(Linear):
    """A Linear whose weight is stored in fp8 with a fp32 `scale` (state-dict keys `weight`, `bias`, `scale`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scale_shape: tuple[int, ...] = (),
        weight_dtype: torch.dtype = torch.float8_e4m3fn,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a full-precision weight
        if weight_dtype not in FP8_DTYPES:
            raise ValueError(f"FP8Linear stores {FP8_DTYPES}; got {weight_dtype}")
        if tuple(scale_shape) not in ((), (out_features, 1)):
            raise ValueError(f"scale shape must be () or ({out_features}, 1); got {tuple(scale_shape)}")
        self.in_features, self.out_features = in_features, out_features
        empty = torch.empty((out_features, in_features), dtype=weight_dtype, device=device)
        self.weight = nn.Parameter(empty, requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, layer: nn.Linear, granularity: str = "tensor") -> FP8Linear:
        """Quantize a Linear (any device, meta included); the bias is kept as it is."""
        q, scale = quantize_fp8(layer.weight.detach(), granularity)
        out = cls(layer.in_features, layer.out_features, bias=False, scale_shape=scale.shape, device="meta")
        out.weight = nn.Parameter(q, requires_grad=False)
        out.scale = scale
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
        return out

    @property
    def granularity(self) -> str:
        return "tensor" if self.scale.ndim == 0 else "channel"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """weight * scale (out, in) in `dtype`: the exact product rounded once, with no fp32 copy of the weight.

        `weight.to(dtype)` is exact (every e4m3/e5m2 value fits fp16, bf16 and fp32); the in-place multiply by the
        fp32 scale (kept at least 2-D, so that it takes part in type promotion) computes each product in fp32 and
        rounds it once into that tensor. Same numbers as `(weight.float() * scale).to(dtype)`, without its two fp32
        (out, in) temporaries: 384 MiB for the largest published layer (mlp_x.w1, 16384 x 3072), whose bf16 result
        is 96 MiB. Rounding the scale to the compute dtype first (`weight.to(dtype) * scale.to(dtype)`) would also
        avoid them, but costs a systematic gain error of up to 2^-9 per layer (or row). Measured on the model of
        tests/test_dit_fp8.py with a GPU's bf16 compute emulated, the relative output error against the fp32 model
        was 8.96e-3 (per tensor) / 8.80e-3 (per channel) with the exact product and 9.02e-3 / 8.71e-3 with the
        rounded scale (weights up to 5.9e-3 off instead of 3.8e-3): e4m3's own rounding dominates either way, so
        the difference is noise there; the exact product is kept since it costs nothing.
        """
        scale = self.scale if self.scale.ndim else self.scale.reshape(1, 1)
        return self.weight.to(dtype).mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * scale rebuilt in the compute dtype (`compute_dtype`: bf16 for bf16 inputs on a GPU or a CPU with
        bf16 instructions, fp32 on other CPUs), then `linear`."""
        return linear(x, self.dequantized(compute_dtype(x.dtype, x.device)), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight.dtype}, scale per {self.granularity}"


def block_linears(model: nn.Module) -> list[str]:
    """Names of the plain Linear layers inside `model.blocks` (FP8Linear ones excluded)."""
    return [
        f"blocks.{i}.{name}"
        for i, block in enumerate(model.blocks)
        for name, m in block.named_modules()
        if isinstance(m, Linear) and not isinstance(m, FP8Linear)
    ]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at dotted `name` (e.g. blocks.3.attn.qkv_x)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@torch.no_grad()
def quantize_dit_fp8(model: nn.Module, granularity: str = "tensor") -> nn.Module:
    """Replace, in place, every Linear inside `model.blocks` with an FP8Linear; returns the model.

    Embedders, the final layer, norms and RoPE frequencies stay in the compute dtype: they are <1% of the weights,
    and the embedders' forwards read their dtype off their Linear weights. One layer is converted at a time, so the
    peak is the model plus one layer's fp32 copy.
    """
    for name in block_linears(model):
        replace_module(model, name, FP8Linear.from_linear(model.get_submodule(name), granularity))
    return model


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (fp8 weights count 1 byte each)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
