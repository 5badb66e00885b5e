"""Step caching as a `dit_hook`: reuse the DiT blocks' work of an earlier step when the inputs barely changed.

`make_cache_hook("teacache:0.06")` or `make_cache_hook("first_block:0.03")` returns a hook for `denoise` /
`pipe(..., dit_hook=...)`; one hook serves one generation. Each CFG branch ("cond", "uncond", or "both" when they are
batched) keeps its own state, and the first and last steps are always computed. `hook.record()` says which calls
were computed and which reused (for the sidecar).

- TeaCache (spec 13.5, as published for Mochi): the indicator is block 0's modulated visual input
  rms_norm(x) * (1 + scale_msa); its relative L1 change since the previous call, rescaled by a fitted polynomial, is
  accumulated; at or above the threshold the blocks run (and the sum resets), below it the cached residual of
  everything up to the final linear projection is added to the embedded tokens.
- First-Block-Cache: block 0 always runs; when its residual changed by less than the threshold (relative L1, against
  the last computed step) the other blocks' cached residual is added to its output.

The hooks run the DiT in pieces (embedding, blocks, final norm, final projection), so they need the `AsymmDiT`
itself as the sampler's model, or `distributed.CFGParallelDiT` around it. Under context parallelism every rank
decides alike: each rank sums the indicator's change over its share of the tokens (and its CFG half's rows), the
sums are all-reduced over the whole `ContextParallel` group, and the ratio is the one-process value, the same number
on every rank. With CFG halves on different ranks the branches are decided once per step, as one batch ("both"),
like the one-process run with batched branches. A DiT sharded over the ranks (`distributed.shard_dit`) is refused:
there block 0's modulation weights, which the indicator needs before any block runs, live on one rank only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from .distributed import CFGParallelDiT, SequenceParallel, is_sharded
from .dit.layers import modulated_rms_norm
from .dit.model import AsymmDiT
from .dit.tokens import TokenLayout
from .sampling import DiTCall

TEACACHE_COEFFICIENTS = (-3512.41319, 811.675948, -60.9400215, 2.42429681, 0.00305291719)  # x^4 ... x^0
DEFAULT_THRESHOLDS = {"teacache": 0.06, "first_block": 0.03}  # about 1.5x fewer block passes on Mochi (spec 13.5)
SPEC_HELP = "'teacache[:THRESHOLD]' or 'first_block[:THRESHOLD]' (a threshold in [0, 1], e.g. teacache:0.06), or off"


def parse_cache_spec(spec: str | None) -> tuple[str, float] | None:
    """ "teacache", "teacache:0.1", "first_block:0.05" -> (kind, threshold); None, "" or "off" -> None."""
    if spec is None or spec.strip().lower() in ("", "off"):
        return None
    kind, _, value = spec.strip().partition(":")
    if kind not in DEFAULT_THRESHOLDS:
        raise ValueError(f"cache must be {SPEC_HELP}; got {spec!r}")
    if not value:
        return kind, DEFAULT_THRESHOLDS[kind]
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"cache threshold must be a number in [0, 1]; got {value!r} in {spec!r}") from None
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"cache threshold must be a number in [0, 1]; got {value!r} in {spec!r}")
    return kind, threshold


def make_cache_hook(spec: str | None, sharded_dit: bool = False) -> StepCache | None:
    """A fresh step-cache hook for one generation from a spec string (see `parse_cache_spec`); None when off.

    `sharded_dit`: the DiT's blocks are spread over the ranks (`distributed.shard_dit`), which caching refuses."""
    if (parsed := parse_cache_spec(spec)) is None:
        return None
    if sharded_dit:
        raise ValueError(SHARDED)
    kind, threshold = parsed
    return {"teacache": TeaCache, "first_block": FirstBlockCache}[kind](threshold)


SHARDED = "cache does not combine with a sharded DiT (shard_dit / --shard_dit): keep the whole DiT on every rank"


# The fit rises to its peak at a relative change of ~0.108, then falls (below 0 past ~0.145): a change that large is
# beyond what it was fitted on, and the bare polynomial would count it as a small one, or subtract it.
TEACACHE_FIT_LIMIT = max(r.real for r in np.roots(np.polyder(TEACACHE_COEFFICIENTS)) if abs(r.imag) < 1e-9)


def teacache_rescale(rel: float) -> float:
    """TeaCache's fitted polynomial for Mochi: maps the indicator's relative change to an output-change estimate,
    held at its peak (~0.099) past `TEACACHE_FIT_LIMIT`, so that a larger change never counts less than a smaller one
    (at the published thresholds 0.06 and 0.09 such a step is always computed)."""
    rel = min(rel, TEACACHE_FIT_LIMIT)
    return sum(c * rel**k for k, c in enumerate(reversed(TEACACHE_COEFFICIENTS)))


def relative_l1(now: torch.Tensor, before: torch.Tensor, weight: torch.Tensor | None = None, group=None) -> float:
    """mean|now - before| / mean|before|, in fp32, as a ratio of sums. `weight` (broadcast to the tensors) is 0 on
    elements to leave out (padding tokens); `group`: the sums are all-reduced over its ranks first, so every rank
    gets the value of all their elements together."""
    before = before.float()
    diff = (now.float() - before).abs()
    before = before.abs()
    if weight is not None:
        diff, before = diff * weight, before * weight
    sums = torch.stack([diff.sum(), before.sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return (sums[0] / sums[1]).item()


# ---- the DiT in pieces (AsymmDiT.forward, taken apart) ---------------------------------------------------------


@dataclass
class _Forward:
    """One forward's shared inputs: what every block and the final layer take, and the latent grid."""

    dit: AsymmDiT
    x: torch.Tensor  # (B, N, Dx) the embedded visual tokens
    y: torch.Tensor  # (B, L, Dy) the projected text
    c_act: torch.Tensor  # (B, Dx)
    rope: tuple
    attn: object
    grid: tuple[int, int, int]  # t, rows, cols
    real: torch.Tensor | None = None  # (1, M, 1): 1 on this rank's real tokens, 0 on padding; None: no padding
    group: object = None  # the process group whose ranks' tokens and rows make one indicator; None: this process

    def change(self, now: torch.Tensor, before: torch.Tensor) -> float:
        """The relative L1 change of a per-token tensor (B, M, D) over every real token of every rank in `group`."""
        return relative_l1(now, before, self.real, self.group)

    def blocks(self, x, y, start: int = 0) -> torch.Tensor:
        """x after blocks start.. (the text stream is not needed after them)."""
        for block in self.dit.blocks[start:]:
            x, y = block(x, y, self.c_act, self.rope, self.attn, self.dit.token_layout)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final layer's modulated LayerNorm (fp32): everything but its linear projection."""
        shift, scale = self.dit.final_layer.mod(self.c_act).float().chunk(2, dim=-1)
        return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1.0 + scale[:, None]) + shift[:, None]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The final linear projection and unpatchify -> velocity (B, C, T, H, W), fp32."""
        linear, (t, rows, cols), p = self.dit.final_layer.linear, self.grid, self.dit.cfg.patch_size
        x = self.dit.token_layout.gather_tokens(linear(h.to(linear.weight.dtype)), num_tokens=t * rows * cols)
        return rearrange(x, "b (t h w) (p1 p2 c) -> b c t (h p1) (w p2)", t=t, h=rows, w=cols, p1=p, p2=p).float()


def _prepare(call: DiTCall, group=None) -> _Forward:
    """Everything AsymmDiT.forward does before its first block; `group`: the ranks that decide together."""
    dit = call.model
    if not isinstance(dit, AsymmDiT):
        raise TypeError(
            "step caching needs the DiT itself (AsymmDiT, or distributed.CFGParallelDiT around it) as the sampler's "
            f"model; got {type(dit).__name__}"
        )
    if is_sharded(dit):
        raise ValueError(SHARDED)
    layout = dit.token_layout
    if type(layout) not in (TokenLayout, SequenceParallel):
        raise ValueError(
            f"step caching knows the one-process token layout and distributed.SequenceParallel; got {type(layout)}"
        )
    if group is None and isinstance(layout, SequenceParallel):
        group = layout.cp.group
    latents, sigma, features, mask = call.inputs()
    b, _, t, h, w = dit._check_inputs(latents, features, mask)
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=latents.device)
    p, dtype = dit.cfg.patch_size, dit.dtype
    rows, cols = h // p, w // p
    frames = rearrange(latents.to(dtype), "b c t h w -> (b t) c h w")
    x = rearrange(dit.x_embedder.proj(frames), "(b t) d h w -> b (t h w) d", b=b)
    x = layout.split_tokens(x)
    real = None  # which of this rank's tokens are real (the last rank's share may be padded)
    if type(layout) is not TokenLayout:
        real = layout.split_tokens(torch.ones(1, t * rows * cols, 1, device=x.device))
    c_act = F.silu(dit.t_embedder(sigma) + dit.t5_y_embedder(features, mask))
    y = dit.t5_yproj(features.to(dtype))
    attn = dit.attention.plan(mask, t * rows * cols, x.device, torch.promote_types(x.dtype, y.dtype), dit.cfg.head_dim)
    rope = tuple(layout.local_heads(r, dim=1) for r in dit.rope_tables(t, rows, cols, latents.device))
    return _Forward(dit, x, y, c_act, rope, attn, (t, rows, cols), real, group)


# ---- the hooks -------------------------------------------------------------------------------------------------


@dataclass
class _Branch:
    """One CFG branch's cache state."""

    reference: torch.Tensor | None = None  # the indicator (or block 0's residual) to compare the next call with
    residual: torch.Tensor | None = None  # what the skipped blocks added
    accumulated: float = 0.0  # TeaCache's rescaled distance since the last computed call


@dataclass
class StepCache:
    """A `dit_hook` that computes or reuses each call; subclasses decide how (`_run`)."""

    threshold: float
    branches: dict[str, _Branch] = field(default_factory=dict)
    calls: list[tuple[int, str, bool]] = field(default_factory=list)  # (step, branch, computed)

    kind = ""

    def __call__(self, call: DiTCall) -> torch.Tensor:
        if call.num_steps is None:
            raise ValueError("step caching needs DiTCall.num_steps (to always compute the last step)")
        if self.calls and call.step < self.calls[-1][0]:  # a new generation starts
            self.branches.clear()
            self.calls.clear()
        state = self.branches.setdefault(call.branch, _Branch())
        forced = call.step in (0, call.num_steps - 1) or self.threshold <= 0
        cp = call.model.cp if isinstance(call.model, CFGParallelDiT) else None
        halves = cp is not None and call.latents.shape[0] % 2 == 0  # odd: the prompts alone, whole on both halves
        if cp is not None:
            call = replace(call, model=call.model.dit)
        if halves:  # [cond; uncond]: this half of the ranks runs its rows; every rank decides for both (one batch)
            b = call.latents.shape[0] // 2
            rows = slice(cp.cfg_rank * b, (cp.cfg_rank + 1) * b)
            call = replace(call, latents=call.latents[rows], text=call.text[rows])
        v, computed = self._run(_prepare(call, cp.group if cp is not None else None), state, forced)
        if halves:
            v = torch.cat(cp.all_gather(v, cp.cfg_group))  # cfg rank 0 holds cond: [cond; uncond]
        self.calls.append((call.step, call.branch, computed))
        return v

    def _run(self, f: _Forward, state: _Branch, forced: bool) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def record(self) -> dict:
        """What was computed and reused, for the sidecar."""
        reused: dict[str, list[int]] = {}
        for step, branch, computed in self.calls:
            if not computed:
                reused.setdefault(branch, []).append(step)
        computed = sum(c for _, _, c in self.calls)
        return dict(
            cache=f"{self.kind}:{self.threshold:g}",
            dit_calls=len(self.calls),
            computed=computed,
            reused=len(self.calls) - computed,
            reused_steps=reused,
        )


class TeaCache(StepCache):
    """TeaCache for Mochi: reuse the residual up to the final projection while the rescaled indicator change stays
    below the threshold."""

    kind = "teacache"

    def _run(self, f: _Forward, state: _Branch, forced: bool) -> tuple[torch.Tensor, bool]:
        scale_msa = f.dit.blocks[0].mod_x(f.c_act).chunk(4, dim=-1)[0]
        indicator = modulated_rms_norm(f.x, scale_msa)
        compute = forced or state.reference is None or state.residual is None
        if not compute:
            state.accumulated += teacache_rescale(f.change(indicator, state.reference))
            compute = state.accumulated >= self.threshold
        state.reference = indicator
        if not compute:
            return f.project(f.x.float() + state.residual), False
        state.accumulated = 0.0
        h = f.final_norm(f.blocks(f.x, f.y))
        state.residual = h - f.x.float()
        return f.project(h), True


class FirstBlockCache(StepCache):
    """First-Block-Cache: reuse the other blocks' residual while block 0's residual changes by less than the
    threshold since the last computed call."""

    kind = "first_block"

    def _run(self, f: _Forward, state: _Branch, forced: bool) -> tuple[torch.Tensor, bool]:
        x1, y1 = f.dit.blocks[0](f.x, f.y, f.c_act, f.rope, f.attn, f.dit.token_layout)
        first = x1 - f.x
        compute = forced or state.reference is None or state.residual is None
        if not compute and f.change(first, state.reference) < self.threshold:
            return f.project(f.final_norm(x1 + state.residual)), False
        x = f.blocks(x1, y1, start=1)
        state.reference, state.residual = first, x - x1
        return f.project(f.final_norm(x)), True
