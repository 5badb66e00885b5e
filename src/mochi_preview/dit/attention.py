"""Joint attention over all visual tokens plus the valid text tokens of each sample, for any batch size.

Valid text tokens of each sample are moved to the front (stable order) and the text axis is cut to the longest
valid count, so attention sees no padding at all when every sample has the same count (B = 1, or equal prompts),
and only a short key mask otherwise. Padded text positions get zeros back, as in the reference.

Backends: "sdpa" (PyTorch's fused kernels, always there), "flash" (flash-attn varlen) and "sage" (SageAttention,
8-bit, a quality trade-off) when installed; "auto" takes flash on a GPU that has it, else SDPA. SDPA runs in query
chunks when asked (and by default on CPU), so memory grows linearly with the sequence whatever kernel PyTorch picks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from .layers import compute_dtype

BACKENDS = ("auto", "sdpa", "flash", "sage")
CPU_CHUNK = 4096  # query rows per SDPA call on CPU: a (4096 x N) score block per head at most


@dataclass(frozen=True)
class TextPacking:
    """Where each sample's valid text tokens are, computed once per forward from the (B, L) mask."""

    index: torch.Tensor  # (B, Lp) positions in [0, L): valid positions first, in order
    valid: torch.Tensor  # (B, Lp) bool: which packed slots hold a valid token
    text_len: int  # L, the padded text length
    needs_mask: bool  # some packed slot is padding (counts differ): attention needs a key mask

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> TextPacking:
        mask = mask.bool()
        counts = mask.sum(dim=1)
        packed_len = int(counts.max()) if mask.numel() else 0
        # A stable sort of ~mask puts the valid positions first, keeping their order.
        index = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :packed_len]
        valid = torch.gather(mask, 1, index)
        # Decided here, once per forward and outside any compiled block (a data-dependent branch breaks graphs).
        return cls(index=index, valid=valid, text_len=mask.shape[1], needs_mask=not bool(valid.all()))

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, Lp, D): the packed text tokens."""
        return torch.gather(y, 1, self.index[:, :, None].expand(-1, -1, y.shape[-1]))

    def scatter(self, y_packed: torch.Tensor) -> torch.Tensor:
        """(B, Lp, D) -> (B, L, D) with zeros at every padding position."""
        b, _, d = y_packed.shape
        out = y_packed.new_zeros(b, self.text_len, d)
        y_packed = y_packed * self.valid[:, :, None].to(y_packed.dtype)
        return out.scatter(1, self.index[:, :, None].expand(-1, -1, d), y_packed)


def available_backends() -> list[str]:
    """Attention backends importable here; SDPA always is."""
    found = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash")
    if importlib.util.find_spec("sageattention") is not None:
        found.append("sage")
    return found


def check_backend(name: str) -> str:
    """Validate a backend name at configuration time ("auto" is resolved per call, once the device is known)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name != "auto" and name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not installed here; available: {available_backends()}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The kernel to run: "auto" -> flash on CUDA when installed (exact, no padding work), else SDPA."""
    if name != "auto":
        return name
    return "flash" if device.type == "cuda" and "flash" in available_backends() else "sdpa"


@dataclass(frozen=True)
class AttentionKernel:
    """Which joint-attention kernel a DiT runs and how: `kernel(q, k, v, num_visual, packing)`."""

    backend: str = "sdpa"
    chunk: int | None = None  # query rows per SDPA call; None: CPU_CHUNK on CPU, one call on GPU

    def __post_init__(self):
        check_backend(self.backend)
        if self.chunk is not None and self.chunk < 0:
            raise ValueError(f"attention chunk must be a number of query rows (0: no chunking); got {self.chunk}")

    def __call__(self, q, k, v, num_visual: int, packing: TextPacking) -> torch.Tensor:
        return joint_attention(q, k, v, num_visual, packing, self.backend, self.chunk)


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_visual: int,
    packing: TextPacking,
    backend: str = "sdpa",
    chunk: int | None = None,
) -> torch.Tensor:
    """Non-causal attention over [visual; packed text] tokens: q, k, v (B, H, N + Lp, d) -> (B, H, N + Lp, d).

    `chunk`: query rows per SDPA call (None: CPU_CHUNK on CPU, one call elsewhere; 0: one call).
    """
    backend = resolve_backend(backend, q.device)
    if backend == "sdpa":
        mask = None
        if packing.needs_mask:
            keep_visual = packing.valid.new_ones(packing.valid.shape[0], num_visual)
            mask = torch.cat([keep_visual, packing.valid], dim=1)[:, None, None, :]  # (B, 1, 1, N + Lp)
        if chunk is None:
            chunk = CPU_CHUNK if q.device.type == "cpu" else 0
        return chunked_sdpa(q, k, v, mask, chunk)
    if backend == "flash":
        return _flash_varlen(q, k, v, num_visual, packing)
    if backend == "sage":
        return _per_sample(q, k, v, num_visual, packing, _sage)
    raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")


def chunked_sdpa(q, k, v, mask: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """SDPA over query blocks of `chunk` rows (0: all at once), in `compute_dtype` (fp32 for half inputs on a CPU,
    which is also what a GPU's flash kernel accumulates in); returns q's dtype."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype, q.device)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not chunk or chunk >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = torch.empty_like(q)
        for i in range(0, q.shape[2], chunk):
            out[:, :, i : i + chunk] = F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, attn_mask=mask)
    return out.to(out_dtype)


def _per_sample(q, k, v, num_visual, packing, kernel):
    """Run an unmasked kernel sample by sample on each sample's valid tokens only."""
    out = torch.zeros_like(q)
    for i in range(q.shape[0]):
        n = num_visual + int(packing.valid[i].sum())
        out[i : i + 1, :, :n] = kernel(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n])
    return out


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def _flash_varlen(q, k, v, num_visual, packing):
    from flash_attn import flash_attn_varlen_func

    b, h, s, d = q.shape
    keep = torch.cat([packing.valid.new_ones(b, num_visual), packing.valid], dim=1).flatten()  # (B*S,)
    lengths = keep.view(b, s).sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    pack = lambda t: rearrange(t, "b h s d -> (b s) h d")[keep]  # (total, H, d)
    out = flash_attn_varlen_func(
        pack(q), pack(k), pack(v), cu_seqlens, cu_seqlens, int(lengths.max()), int(lengths.max())
    )
    full = q.new_zeros(b * s, h, d)
    full[keep] = out
    return rearrange(full, "(b s) h d -> b h s d", b=b)
