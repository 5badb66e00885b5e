"""Where the visual tokens and attention heads of a DiT forward live: all in this process, or shared by several.

The DiT's forward calls a `TokenLayout` at six points. `TokenLayout` itself is the one-process layout: each method
returns its input unchanged (no communication, no padding), so the forward reads as plain single-device code.
`distributed.SequenceParallel` is the context-parallel one (Ulysses): each of G ranks keeps M = ceil(N / G) of the
N visual tokens, and around attention an all-to-all swaps tokens for heads, so each rank attends over all N tokens
with H / G of the H heads. The shapes below are written for G ranks; in one process G = 1 and M = N.
"""

from __future__ import annotations

import torch


class TokenLayout:
    """The one-process layout: every token and every head is here, and every method returns its input as it is."""

    def split_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, M, D): this rank's share of the visual tokens."""
        return x

    def tokens_to_heads(self, qkv: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Before attention: (B, M, 3 H d) for this rank's tokens -> (B, N, 3 (H/G) d) for this rank's heads."""
        return qkv

    def heads_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """After attention: (B, N, (H/G) d) for this rank's heads -> (B, M, H d) for this rank's tokens."""
        return out

    def local_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's H / G heads of a tensor every rank holds whole (text q/k/v, RoPE tables); heads at `dim`."""
        return t

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, (H/G) d) -> (B, L, H d): every rank's heads, in head order."""
        return t

    def gather_tokens(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(B, M, D) -> (B, N, D): every rank's tokens in order, on every rank."""
        return x
