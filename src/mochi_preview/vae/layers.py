"""Building blocks of the AsymmVAE: causal 3D convolution, per-frame group norm, residual block, causal temporal
attention and depth-to-space-time.

Modules that carry state along time take an optional `state` (a `StreamState`, see stream.py) holding what they
need from earlier chunks of the same stream: a convolution's last input frames, attention keys and values, whether
the video has started. Feeding a video in successive time chunks with one shared state gives the same result as
feeding it whole; `state=None` means "the whole video at once".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .stream import StreamState

GROUP_NORM_CHUNK = 2**24  # elements normalized at once (64 MiB in fp32), so the fp32 copy stays small
STEP_ELEMENTS = 2**22  # values per step of a decoder level at inference (see frames_per_step)


def frames_per_step(frame_values: int) -> int:
    """Frames per step of a decoder level whose frame holds `frame_values` values (B * C * H * W): one frame at the
    large levels (least memory), several at the small ones, where per-call overhead would otherwise dominate."""
    return max(1, STEP_ELEMENTS // frame_values)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time with k_t - 1 copies of the first frame in front, and replicate-padded in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=True)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        kt, kh, kw = self.kernel_size
        pt, ph, pw = kt - 1, (kh - 1) // 2, (kw - 1) // 2
        if pt or ph or pw:
            # One replicate pad of all three axes equals time-then-space padding (every padded frame is a copy).
            x = F.pad(x, (pw, pw, ph, ph, pt, 0), mode="replicate")  # (B, C, pt + T, H + 2ph, W + 2pw)
        if state is not None and pt:
            previous = state.conv_frames(self)
            if previous is not None:
                x[:, :, :pt] = previous  # the previous chunk's last frames replace the replicated ones
            state.set_conv_frames(self, x[:, :, -pt:].clone())
        return F.conv3d(x, self.weight, self.bias, self.stride)


class GroupNormSpatial(nn.GroupNorm):
    """GroupNorm over each frame on its own (never over time), computed in fp32 and stored in the input dtype."""

    def __init__(self, num_channels: int, num_groups: int = 32):
        super().__init__(num_groups, num_channels, eps=1e-5, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        out = torch.empty_like(x)
        step = max(1, GROUP_NORM_CHUNK // (b * c * h * w))
        weight, bias = self.weight.float(), self.bias.float()
        for t0 in range(0, t, step):
            frames = rearrange(x[:, :, t0 : t0 + step], "b c t h w -> (b t) c h w").float()
            frames = F.group_norm(frames, self.num_groups, weight, bias, self.eps)
            out[:, :, t0 : t0 + step] = rearrange(frames, "(b t) c h w -> b c t h w", b=b)
        return out


class Conv1x1(nn.Linear):
    """A linear map over the channel axis of (B, C, T, H, W); weight [out, in] like nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        b, _, t, h, w = x.shape
        y = torch.matmul(self.weight, x.reshape(b, -1, t * h * w))  # (B, C_out, T*H*W), no channel-last copies
        if self.bias is not None:
            y += self.bias[:, None]
        return y.view(b, -1, t, h, w)


class CausalTemporalAttention(nn.Module):
    """Causal self-attention along time at each pixel, with L2-normalized queries and keys and no positions."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        x = rearrange(x, "b c t h w -> (b h w) t c")
        qkv = self.qkv(x)  # (N, T, 3C), laid out [q | k | v], heads slowest within each
        if t == 1 and state is None:
            y = qkv[..., 2 * c :]  # attention over a single key returns its value
        else:
            q, k, v = rearrange(qkv, "n t (three heads d) -> three n heads t d", three=3, d=self.head_dim)
            q = F.normalize(q.float(), dim=-1, eps=1e-12).to(qkv.dtype)
            k = F.normalize(k.float(), dim=-1, eps=1e-12).to(qkv.dtype)
            mask = None
            if state is not None:
                past = state.attention_kv(self)
                if past is not None:  # queries follow the earlier keys: query i sees keys up to len(past) + i
                    k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
                    mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
                state.set_attention_kv(self, k, v)
            # Chunks of 2^15 sequences: larger batches exceed CUDA launch limits (same result).
            y = torch.cat(
                [
                    F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None)
                    for qs, ks, vs in zip(q.split(2**15), k.split(2**15), v.split(2**15))
                ]
            )
            y = rearrange(y, "n heads t d -> n t (heads d)")
        y = self.out(y)
        return rearrange(y, "(b h w) t c -> b c t h w", b=b, h=h, w=w)


class AttentionBlock(nn.Module):
    """x + causal temporal attention of the group-normalized x."""

    def __init__(self, dim: int, head_dim: int = 32):
        super().__init__()
        self.norm = GroupNormSpatial(dim)
        self.attn = CausalTemporalAttention(dim, head_dim)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        return x + self.attn(self.norm(x), state)


class ResBlock(nn.Module):
    """x + [GN, SiLU, causal 3x3x3 conv, GN, SiLU, causal 3x3x3 conv](x), then optional attention."""

    def __init__(self, dim: int, attention: bool = False, head_dim: int = 32):
        super().__init__()
        # Indices match the native keys: stack.0 / stack.3 are the norms, stack.2 / stack.5 the convolutions.
        self.stack = nn.Sequential(
            GroupNormSpatial(dim),
            nn.SiLU(inplace=True),  # in place on the norm's fresh output: one activation-sized buffer fewer
            CausalConv3d(dim, dim, 3),
            GroupNormSpatial(dim),
            nn.SiLU(inplace=True),
            CausalConv3d(dim, dim, 3),
        )
        self.attn_block = AttentionBlock(dim, head_dim) if attention else None

    def forward(self, x: torch.Tensor, state: StreamState | None = None, step: int | None = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> same shape. With `step` (inference only), `step` frames at a time, each result written
        over its own input frames: the stream state carries the context, so the numbers are those of the whole-video
        pass, with memory for x plus one step's intermediates instead of ~4 copies of x. x is overwritten."""
        if step is None or torch.is_grad_enabled() or x.shape[2] <= step:
            return self._residual(x, state)
        state = StreamState() if state is None else state
        for t0 in range(0, x.shape[2], step):
            x[:, :, t0 : t0 + step] = self._residual(x[:, :, t0 : t0 + step], state)
        return x

    def _residual(self, x: torch.Tensor, state: StreamState | None) -> torch.Tensor:  # (B, C, T, H, W)
        norm1, act1, conv1, norm2, act2, conv2 = self.stack
        h = conv1(act1(norm1(x)), state)
        h = conv2(act2(norm2(h)), state)
        h += x  # in place on the conv's fresh output (autograd-safe: a conv does not keep its output)
        if self.attn_block is not None:
            h = self.attn_block(h, state)
        return h

    def use_compiled(self, math) -> None:
        """Run the branch's norms, activations and padding through `math`, a torch.compile of `norm_silu_pad`
        shared by every ResBlock (Decoder.compile_blocks); the convolutions and the stream state stay outside it."""
        self._math = math
        self._residual = self._residual_compiled  # an instance attribute: `_residual` of this block only

    def _residual_compiled(self, x: torch.Tensor, state: StreamState | None) -> torch.Tensor:
        """`_residual` with each convolution's input made by the compiled `norm_silu_pad` (group norm, SiLU and the
        causal padding fused into one pass): the compiled code sees tensors and numbers only, never the stream state
        (read before it, written after it) or a module, so its guards are shapes, dtypes and whether a chunk starts
        the video: the same few compilations serve every block, chunk length and decode."""
        norm1, _, conv1, norm2, _, conv2 = self.stack
        h = x.contiguous()  # a step of a level is a strided view: one layout, one set of guards
        for norm, conv in ((norm1, conv1), (norm2, conv2)):
            previous = state.conv_frames(conv) if state is not None else None
            if previous is not None:  # always k_t - 1 frames: a constant, not a size to share a symbol with
                torch._dynamo.mark_static(previous, 2)
            padded, last = self._math(h, previous, norm.weight, norm.bias, norm.num_groups, norm.eps, conv.kernel_size)
            if state is not None:
                state.set_conv_frames(conv, last)
            h = F.conv3d(padded, conv.weight, conv.bias)
            del padded
        h += x
        if self.attn_block is not None:
            h = self.attn_block(h, state)
        return h


def norm_silu_pad(
    x: torch.Tensor,
    previous: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float,
    kernel: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNormSpatial, SiLU and CausalConv3d's padding as plain tensor math (what Decoder.compile_blocks compiles).

    x (B, C, T, H, W) -> (the convolution's padded input (B, C, k_t - 1 + T, H + 2 (k_h // 2), ...), its last
    k_t - 1 frames, which the next chunk of the stream takes as `previous`; None: the chunk starts the video, whose
    first frame is replicated). The same numbers as the eager modules (the norm in fp32, stored in x's dtype).
    """
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w).float()
    y = F.group_norm(frames, groups, weight.float(), bias.float(), eps).to(x.dtype)
    y = F.silu(y.reshape(b, t, c, h, w).transpose(1, 2))
    kt, kh, kw = kernel
    pt, ph, pw = kt - 1, (kh - 1) // 2, (kw - 1) // 2
    y = F.pad(y, (pw, pw, ph, ph, pt, 0), mode="replicate")
    if previous is not None:
        y = torch.cat([previous, y[:, :, pt:]], dim=2)
    return y, y[:, :, y.shape[2] - pt :].clone()


class DepthToSpaceTime(nn.Module):
    """(B, C*st*s*s, T, H, W) -> (B, C, T*st, H*s, W*s), then drop the first st - 1 frames of the video."""

    def __init__(self, temporal: int, spatial: int):
        super().__init__()
        self.temporal, self.spatial = temporal, spatial

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        st, s = self.temporal, self.spatial
        x = rearrange(x, "b (c st sh sw) t h w -> b c (t st) (h sh) (w sw)", st=st, sh=s, sw=s)
        first_chunk = state is None or not state.started(self)
        if state is not None:
            state.mark_started(self)  # later chunks of the stream keep all their frames
        if first_chunk and st > 1:
            # Sub-frames before latent frame 0 are not part of the video (causal: frame 0 stands alone).
            x = x[:, :, st - 1 :]
        return x
