"""Joint attention over all visual tokens plus the valid text tokens of each sample, for any batch size.

Valid text tokens of each sample are moved to the front (stable order) and the text axis is cut to the longest
valid count, so attention sees no padding at all when every sample has the same count (B = 1, or equal prompts),
and only a short key mask otherwise. Padded text positions get zeros back, as in the reference.

Backends: "sdpa" (PyTorch's fused kernels, always there), "flash" (flash-attn varlen) and "sage" (SageAttention,
8-bit, a quality trade-off) when installed. "auto" takes flash-attn only where it can run: fp16/bf16 inputs on a
CUDA GPU of compute capability 8.0 or more, and only once a tiny test call has given the right numbers; anywhere
else SDPA, with a one-line warning on a GPU. SDPA runs in query chunks when asked (and by default on CPU), so memory
grows linearly with the sequence whatever kernel PyTorch picks.

Decided once, not per call: `AttentionKernel.resolve` chooses the backend once per (device, dtype) and keeps it;
`AttentionKernel.plan` runs once per DiT forward and builds a `JointAttention` holding everything each block's
attention needs (the text packing, SDPA's key mask, flash-attn's sequence offsets and token index), with one host
synchronisation in all (the per-sample text counts).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import HALF, compute_dtype

BACKENDS = ("auto", "sdpa", "flash", "sage")
CPU_CHUNK = 4096  # query rows per SDPA call on CPU: a (4096 x N) score block per head at most
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 needs Ampere or newer
PROBE_TOLERANCE = 2e-2  # the test call's largest error against fp32 attention (bf16 rounding is ~4e-3 here)


@dataclass(frozen=True)
class TextPacking:
    """Where each sample's valid text tokens are, computed once per forward from the (B, L) mask."""

    index: torch.Tensor  # (B, Lp) positions in [0, L): valid positions first, in order
    valid: torch.Tensor  # (B, Lp) bool: which packed slots hold a valid token
    counts: tuple[int, ...]  # valid text tokens per sample, on the host
    lengths: torch.Tensor  # (B,) int64 the same counts, on the mask's device
    text_len: int  # L, the padded text length
    needs_mask: bool  # some packed slot is padding (counts differ): attention needs a key mask

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> TextPacking:
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        counts = tuple(lengths.tolist())  # the forward's one host synchronisation: every size below follows from it
        packed_len = max(counts, default=0)
        # A stable sort of ~mask puts the valid positions first, keeping their order.
        index = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :packed_len]
        valid = torch.gather(mask, 1, index)
        # Decided here, once per forward and outside any compiled block (a data-dependent branch breaks graphs).
        needs_mask = min(counts, default=0) != packed_len
        return cls(index, valid, counts, lengths, mask.shape[1], needs_mask)

    @property
    def packed_len(self) -> int:
        """Lp, the longest valid count: the text length attention sees."""
        return self.index.shape[1]

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, Lp, D): the packed text tokens."""
        return torch.gather(y, 1, self.index[:, :, None].expand(-1, -1, y.shape[-1]))

    def scatter(self, y_packed: torch.Tensor) -> torch.Tensor:
        """(B, Lp, D) -> (B, L, D) with zeros at every padding position."""
        b, _, d = y_packed.shape
        out = y_packed.new_zeros(b, self.text_len, d)
        y_packed = y_packed * self.valid[:, :, None].to(y_packed.dtype)
        return out.scatter(1, self.index[:, :, None].expand(-1, -1, d), y_packed)


@dataclass(frozen=True)
class VarlenLayout:
    """flash-attn's view of one forward's joint sequences: sample i is its N visual tokens, then its valid text.

    In the (B, N + Lp) packed layout sample i's real tokens are the first N + count_i, so the offsets and the token
    index follow from the host counts with no synchronisation. Without padding (every count equal) all B (N + Lp)
    slots are real: `index` is None and q, k, v go to the kernel as views, with nothing copied.
    """

    cu_seqlens: torch.Tensor  # (B + 1,) int32 start of each sample in the flat token list
    max_len: int  # N + Lp
    index: torch.Tensor | None  # (total,) int64 flat positions of the real tokens in (B (N + Lp)); None: all

    @classmethod
    def build(cls, packing: TextPacking, num_visual: int) -> VarlenLayout:
        device, b = packing.index.device, len(packing.counts)
        s = num_visual + packing.packed_len
        if not packing.needs_mask:
            return cls(torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device), s, None)
        lengths = packing.lengths + num_visual  # (B,)
        starts = F.pad(lengths.cumsum(0), (1, 0))  # (B + 1,)
        total = b * num_visual + sum(packing.counts)
        # Token j of sample i sits at i s + (j - starts[i]); output_size keeps repeat_interleave off the host.
        shift = torch.repeat_interleave(torch.arange(b, device=device) * s - starts[:-1], lengths, output_size=total)
        index = torch.arange(total, device=device) + shift
        return cls(starts.to(torch.int32), s, index)


@dataclass(frozen=True)
class JointAttention:
    """One forward's attention: `attn(q, k, v)` on (B, N + Lp, H, d) tensors, the same for every block."""

    backend: str  # resolved: "sdpa", "flash" or "sage"
    packing: TextPacking
    num_visual: int
    chunk: int = 0  # SDPA query rows per call (0: one call)
    sdpa_mask: torch.Tensor | None = None  # (B, 1, 1, N + Lp) bool, when some sample has padding
    varlen: VarlenLayout | None = None  # flash only
    flash_fn: Callable | None = None  # flash_attn_varlen_func, as resolved

    def gather(self, y: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, Lp, D): the valid text tokens."""
        return self.packing.gather(y)

    def scatter(self, y_packed: torch.Tensor) -> torch.Tensor:
        """(B, Lp, D) -> (B, L, D), zeros at padding positions."""
        return self.packing.scatter(y_packed)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Non-causal attention over [visual; packed text]: q, k, v (B, S, H, d) -> (B, S, H, d), S = N + Lp."""
        if self.backend == "flash":
            return _flash_varlen(q, k, v, self.varlen, self.flash_fn)
        if self.backend == "sage":
            return _per_sample(q, k, v, self.num_visual, self.packing.counts, _sage)
        # SDPA takes (B, H, S, d): transposed views, and its output is laid out (B, S, H, d) again.
        out = chunked_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.sdpa_mask, self.chunk)
        return out.transpose(1, 2)


def available_backends() -> list[str]:
    """Attention backends importable here; SDPA always is."""
    found = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash")
    if importlib.util.find_spec("sageattention") is not None:
        found.append("sage")
    return found


def check_backend(name: str) -> str:
    """Validate a backend name at configuration time ("auto" is resolved per device and dtype, at the first use)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name != "auto" and name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not installed here; available: {available_backends()}")
    return name


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def flash_blocker(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn cannot run attention on (device, dtype), or None when it can.

    The cheap facts first (dtype, GPU generation, package), then one tiny varlen call against fp32 attention: a
    wheel that imports but was built for another GPU, CUDA or torch fails here and not in the first block.
    """
    if dtype not in HALF:
        return f"flash-attn takes fp16/bf16 inputs, not {str(dtype).removeprefix('torch.')}"
    capability = cuda_capability(device)
    if capability is None:
        return f"flash-attn runs on CUDA GPUs, not {device.type}"
    if capability < FLASH_MIN_CAPABILITY:
        return f"the GPU's compute capability is {capability[0]}.{capability[1]}; flash-attn needs 8.0 or more"
    try:
        fn = _import_flash()
    except ModuleNotFoundError as e:
        if e.name == "flash_attn":
            return "flash-attn is not installed"
        return f"flash-attn does not import ({_describe(e)})"
    except Exception as e:  # a broken install can raise anything on import
        return f"flash-attn does not import ({_describe(e)})"
    return _probe_flash(fn, device, dtype, head_dim)


def _import_flash() -> Callable:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def _probe_flash(fn: Callable, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """One tiny varlen call (two sequences of 3 and 5 tokens, 2 heads) checked against fp32 SDPA on the CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 2, head_dim, generator=g).to(dtype).unbind(0)  # exact in the probe's dtype
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    want = torch.cat(
        [
            F.scaled_dot_product_attention(*(t[a:b].float().transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            for a, b in ((0, 3), (3, 8))
        ]
    )
    try:
        dev = lambda t: t.to(device)
        out = fn(dev(q), dev(k), dev(v), dev(cu), dev(cu), 5, 5)
        err = float((out.float().cpu() - want).abs().max())  # waits for the kernel: asynchronous errors surface
    except Exception as e:  # whatever the kernel raises, SDPA is the answer
        return f"flash-attn's test call failed ({_describe(e)})"
    if not err <= PROBE_TOLERANCE:  # also catches NaN
        return f"flash-attn's test call gave wrong numbers (largest error {err:.3g})"
    return None


def _describe(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class AttentionKernel:
    """Which joint-attention kernel a DiT runs and how; `plan` gives each forward its `JointAttention`.

    `resolved` maps (device, dtype) to the backend chosen for it, once; `in_use` is the one the latest forward ran.
    """

    def __init__(self, backend: str = "sdpa", chunk: int | None = None):
        check_backend(backend)
        if chunk is not None and chunk < 0:
            raise ValueError(f"attention chunk must be a number of query rows (0: no chunking); got {chunk}")
        self.backend, self.chunk = backend, chunk  # as asked for
        self.resolved: dict[tuple[torch.device, torch.dtype], str] = {}
        self.in_use: str | None = None
        self._flash_fn: Callable | None = None

    def __repr__(self) -> str:
        return f"AttentionKernel(backend={self.backend!r}, chunk={self.chunk}, in_use={self.in_use!r})"

    def resolve(self, device: torch.device | str, dtype: torch.dtype, head_dim: int = 128) -> str:
        """The backend to run for inputs of `dtype` on `device`: decided at the first call, then kept.

        "auto": flash-attn where `flash_blocker` finds nothing against it, else SDPA (with a warning on a GPU).
        An explicit "flash" or "sage" that cannot run here is an error, raised now rather than inside a block.
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and the tensors' "cuda:0": one decision
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        if key not in self.resolved:
            self.resolved[key] = self._choose(device, dtype, head_dim)
        return self.resolved[key]

    def _choose(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
        name = str(dtype).removeprefix("torch.")
        if self.backend == "sdpa":
            return "sdpa"
        if self.backend == "sage":
            if device.type != "cuda" or dtype not in HALF:
                raise RuntimeError(
                    f"attention backend 'sage' needs fp16/bf16 inputs on a CUDA GPU, not {name} on "
                    f"{device}; use 'auto' or 'sdpa'"
                )
            return "sage"
        if self.backend == "auto" and cuda_capability(device) is None:
            return "sdpa"  # CPU, MPS, ...: SDPA is the only choice, nothing to say
        reason = flash_blocker(device, dtype, head_dim)
        if reason is None:
            self._flash_fn = _import_flash()
            return "flash"
        if self.backend == "flash":
            raise RuntimeError(
                f"attention backend 'flash' cannot run {name} on {device}: {reason}; use 'auto' or 'sdpa'"
            )
        warnings.warn(f"attention 'auto' runs PyTorch SDPA for {name} on {device}: {reason}", stacklevel=3)
        return "sdpa"

    def plan(
        self, text_mask: torch.Tensor, num_visual: int, device: torch.device, dtype: torch.dtype, head_dim: int = 128
    ) -> JointAttention:
        """Everything one forward's attention needs, computed once for all its blocks (`dtype`: of q, k, v)."""
        backend = self.in_use = self.resolve(device, dtype, head_dim)
        packing = TextPacking.from_mask(text_mask)
        if backend == "flash":
            return JointAttention(
                backend, packing, num_visual, varlen=VarlenLayout.build(packing, num_visual), flash_fn=self._flash_fn
            )
        if backend == "sage":
            return JointAttention(backend, packing, num_visual)
        mask = None
        if packing.needs_mask:
            keep_visual = packing.valid.new_ones(packing.valid.shape[0], num_visual)
            mask = torch.cat([keep_visual, packing.valid], dim=1)[:, None, None, :]  # (B, 1, 1, N + Lp)
        chunk = self.chunk if self.chunk is not None else (CPU_CHUNK if torch.device(device).type == "cpu" else 0)
        return JointAttention(backend, packing, num_visual, chunk=chunk, sdpa_mask=mask)


def chunked_sdpa(q, k, v, mask: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """SDPA over query blocks of `chunk` rows (0: all at once), in `compute_dtype` (fp32 for half inputs on a CPU
    without half instructions; fp32 is also what the half kernels accumulate in); (B, H, S, d) in and out, in q's
    dtype and layout."""
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype, q.device)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if not chunk or chunk >= q.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = torch.empty_like(q)
        for i in range(0, q.shape[2], chunk):
            out[:, :, i : i + chunk] = F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v, attn_mask=mask)
    return out.to(out_dtype)


def _per_sample(q, k, v, num_visual: int, counts: tuple[int, ...], kernel):
    """Run an unmasked kernel sample by sample on each sample's valid tokens only; (B, S, H, d)."""
    out = torch.zeros_like(q)
    for i, count in enumerate(counts):
        n = num_visual + count
        out[i : i + 1, :n] = kernel(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n])
    return out


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _flash_varlen(q, k, v, varlen: VarlenLayout, fn: Callable) -> torch.Tensor:
    """flash-attn on (B, S, H, d) q, k, v (contiguous): without padding as (B S, H, d) views, nothing copied;
    with padding only the real tokens are gathered, and the output has zeros at the padded slots."""
    if q.dtype not in HALF:  # resolved for another dtype than the forward ran in (e.g. under an outside autocast)
        raise RuntimeError(f"flash-attn takes fp16/bf16 inputs; got {q.dtype}")
    b, s, h, d = q.shape
    flat = lambda t: t.reshape(b * s, h, d)  # a view of a contiguous (B, S, H, d) tensor
    lens = (varlen.cu_seqlens, varlen.cu_seqlens, varlen.max_len, varlen.max_len)
    if varlen.index is None:
        return fn(flat(q), flat(k), flat(v), *lens).view(b, s, h, d)
    pick = lambda t: flat(t).index_select(0, varlen.index)  # (total, H, d)
    out = fn(pick(q), pick(k), pick(v), *lens)
    return q.new_zeros(b * s, h, d).index_copy_(0, varlen.index, out).view(b, s, h, d)
