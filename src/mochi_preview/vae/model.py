"""The AsymmVAE decoder and encoder with Genmo's native structure, key names and semantics.

Configs list levels in native order, from the pixel side (level 0) to the latent side: `channels[0]` is the width
next to the video, `channels[-1]` the width next to the latents; `num_res_blocks` has one more entry than
`channels` (level 0, one per up/down block, and the latent-side stack last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import VideoGeometry
from .layers import (
    CausalConv3d,
    Conv1x1,
    DepthToSpaceTime,
    GroupNormSpatial,
    ResBlock,
    frames_per_step,
    norm_silu_pad,
)
from .stream import StreamState


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder shape; the defaults are the published Mochi 1 preview decoder (362,526,595 parameters)."""

    latent_dim: int = 12
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 768)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    has_attention: tuple[bool, ...] | None = None  # None: no attention anywhere (the published decoder)

    def __post_init__(self):
        n = len(self.channels)
        if self.has_attention is None:
            object.__setattr__(self, "has_attention", (False,) * (n + 1))
        if not (len(self.num_res_blocks) == len(self.has_attention) == n + 1):
            raise ValueError(f"num_res_blocks and has_attention need {n + 1} entries for {n} channel levels")
        if not (len(self.temporal_expansions) == len(self.spatial_expansions) == n - 1):
            raise ValueError(f"temporal_expansions and spatial_expansions need {n - 1} entries for {n} levels")
        if any(c % 32 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of 32 (GroupNorm with 32 groups)")

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_expansions)

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_expansions)

    @property
    def geometry(self) -> VideoGeometry:
        """This decoder's frame and pixel rule (6x time, 8x space for the published one; the VAE alone: patch 1)."""
        return VideoGeometry(
            temporal=self.temporal_factor, spatial=self.spatial_factor, patch=1, channels=self.latent_dim
        )

    def num_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames`: each stage drops st - 1 of its T*st frames."""
        return self.geometry.num_frames(latent_frames)


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder shape; the defaults are the published Mochi 1 preview encoder (97,222,016 parameters)."""

    in_channels: int = 15  # 3 colour channels and their Fourier features
    channels: tuple[int, ...] = (64, 128, 256, 384)
    num_res_blocks: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_reductions: tuple[int, ...] = (1, 2, 3)
    spatial_reductions: tuple[int, ...] = (2, 2, 2)
    has_attention: tuple[bool, ...] = (False, True, True, True, True)
    latent_dim: int = 12
    fourier_exponents: tuple[int, ...] = (6, 7)  # features at frequencies 2^e * 2π

    def __post_init__(self):
        n = len(self.channels)
        if not (len(self.num_res_blocks) == len(self.has_attention) == n + 1):
            raise ValueError(f"num_res_blocks and has_attention need {n + 1} entries for {n} channel levels")
        if not (len(self.temporal_reductions) == len(self.spatial_reductions) == n - 1):
            raise ValueError(f"temporal_reductions and spatial_reductions need {n - 1} entries for {n} levels")
        if any(c % 32 for c in self.channels):
            raise ValueError(f"channels {self.channels} must be multiples of 32 (GroupNorm with 32 groups)")
        if self.in_channels != 3 * (1 + 2 * len(self.fourier_exponents)):
            raise ValueError(
                f"in_channels {self.in_channels} does not match RGB plus sin and cos at "
                f"{len(self.fourier_exponents)} frequencies ({3 * (1 + 2 * len(self.fourier_exponents))})"
            )

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_reductions)

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_reductions)

    @property
    def geometry(self) -> VideoGeometry:
        """The frame and pixel rule of this encoder's input (the VAE alone: no DiT patches, so patch 1)."""
        return VideoGeometry(
            temporal=self.temporal_factor, spatial=self.spatial_factor, patch=1, channels=self.latent_dim
        )


class UpsampleBlock(nn.Module):
    """ResBlocks at the input width, a channel projection, then depth-to-space-time."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, attention: bool, temporal: int, spatial: int):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(c_in, attention) for _ in range(num_res_blocks)])
        self.proj = Conv1x1(c_in, c_out * temporal * spatial**2)
        self.d2st = DepthToSpaceTime(temporal, spatial)

    def forward(self, x: torch.Tensor, state: StreamState | None = None, step: int | None = None) -> torch.Tensor:
        """(B, C_in, T, H, W) -> (B, C_out, T * st (- st + 1 on the first chunk), H * s, W * s); `step`: see
        ResBlock (the projection and depth-to-space then also go `step` frames at a time, into one output)."""
        if step is not None and not torch.is_grad_enabled():
            state = StreamState() if state is None else state
        else:
            step = None
        for block in self.blocks:
            x = block(x, state, step)
        if step is None or x.shape[2] <= step:
            return self.d2st(self.proj(x), state)
        pieces = (self.d2st(self.proj(x[:, :, t0 : t0 + step]), state) for t0 in range(0, x.shape[2], step))
        first = next(pieces)
        b, c, t_first, h, w = first.shape
        out = first.new_empty(b, c, t_first + (x.shape[2] - step) * self.d2st.temporal, h, w)
        out[:, :, :t_first] = first
        f0 = t_first
        for piece in pieces:
            out[:, :, f0 : f0 + piece.shape[2]] = piece
            f0 += piece.shape[2]
        return out


class Decoder(nn.Module):
    """Native Mochi VAE decoder: latents (B, 12, T, H, W) -> video (B, 3, 6T - 5, 8H, 8W), roughly in [-1, 1]."""

    def __init__(self, config: DecoderConfig = DecoderConfig()):
        super().__init__()
        self.config = cfg = config
        c, n, attn = cfg.channels, cfg.num_res_blocks, cfg.has_attention
        # blocks.0: a 1x1x1 Conv3d into the widest level, then its ResBlocks; blocks.1..: upsampling from the
        # latent side; last: the ResBlocks at the pixel-side width.
        first = nn.ModuleList([nn.Conv3d(cfg.latent_dim, c[-1], kernel_size=1)])
        first.extend(ResBlock(c[-1], attn[-1]) for _ in range(n[-1]))
        ups = [
            UpsampleBlock(c[i], c[i - 1], n[i], attn[i], cfg.temporal_expansions[i - 1], cfg.spatial_expansions[i - 1])
            for i in range(len(c) - 1, 0, -1)
        ]
        last = nn.ModuleList(ResBlock(c[0], attn[0]) for _ in range(n[0]))
        self.blocks = nn.ModuleList([first, *ups, last])
        self.output_proj = Conv1x1(c[0], cfg.out_channels)

    def forward(
        self, z: torch.Tensor, state: StreamState | None = None, step: int | str | None = "auto"
    ) -> torch.Tensor:
        """The network: raw VAE-space latents (B, 12, T, H, W) -> the float video of that chunk, (B, 3, T_out, 8H, 8W)
        in the decoder's dtype, not clamped. T_out is 6T - 5 for a chunk that starts the video and 6T for a later one.

        This is one pass of the network, with no memory planning: to decode latents in chunks, tiles or across ranks
        and get a float32 video, use `vae.decode(decoder, z, ...)`. `state` carries the causal context between time
        chunks of one stream (a `StreamState`; None: the whole video at once). At inference every level runs `step` of
        its frames at a time (see ResBlock): the same numbers, with about one copy of each level's activation alive
        instead of several. "auto" sizes the step per level (`frames_per_step`); None runs each level on all its
        frames at once. Latents in another dtype (often fp32 for a bf16 decoder) are cast at the entrance.
        """
        z = z.to(self.output_proj.weight.dtype)
        level_step = lambda x: frames_per_step(x[:, :, 0].numel()) if step == "auto" else step  # noqa: E731
        first, *ups, last = self.blocks
        x = first[0](z)  # (B, C_top, T, H, W)
        for block in first[1:]:
            x = block(x, state, level_step(x))
        for up in ups:
            x = up(x, state, level_step(x))  # (B, C_next, ~T * st, H * s, W * s)
        for block in last:
            x = block(x, state, level_step(x))
        x = F.silu(x, inplace=True)  # no norm before the last activation in the native decoder
        return self.output_proj(x)  # (B, 3, T_out, H_out, W_out)

    def compile_blocks(self, **compile_kwargs) -> Decoder:
        """Opt in to torch.compile for every ResBlock's residual branch (fusing its group norms and activations with
        the padding around the convolutions). Weights and state-dict keys are unchanged.

        One compiled function serves every ResBlock: `layers.norm_silu_pad`, with the weights, the input and the
        stream's carried frames as arguments; the stream state is read and written outside it and the convolutions
        run as they are (a library kernel either way). Its guards are shapes (dynamic by default), dtypes and
        whether a chunk starts the video, never a block or a state object: a handful of compilations for any number
        of blocks, chunk lengths and decodes, far below dynamo's recompile limit."""
        compiled = torch.compile(norm_silu_pad, **{"dynamic": True, **compile_kwargs})

        def math(*args):
            # Sizes that happen to be equal in the first call (4 frames of 4 latent rows) stay separate symbols:
            # otherwise the compiled code would guard on that coincidence and compile again when it ends.
            with _no_duck_shapes():
                return compiled(*args)

        for module in self.modules():
            if isinstance(module, ResBlock):
                module.use_compiled(math)
        return self


def _no_duck_shapes():
    """torch.compile without "duck sizing" (one symbol for sizes equal when traced), where torch has the switch."""
    from contextlib import nullcontext

    try:
        from torch.fx.experimental import _config as config
    except ImportError:
        return nullcontext()
    return config.patch(use_duck_shape=False) if hasattr(config, "use_duck_shape") else nullcontext()


def fourier_features(video: torch.Tensor, exponents: tuple[int, ...] = (6, 7)) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C + 2 * C * F, T, H, W) in fp32: [x, sin(w x), cos(w x)], w = 2^e * 2π per channel."""
    x = video.float()  # high frequencies: fp32 always (bf16 would alias them)
    w = torch.pow(2.0, torch.tensor(exponents, dtype=torch.float32, device=x.device)) * (2 * torch.pi)
    h = x.repeat_interleave(len(exponents), dim=1) * w.repeat(x.shape[1])[:, None, None, None]  # (c0 w0, c0 w1, ..)
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)


class DownsampleBlock(nn.Module):
    """A strided causal convolution (kernel = stride = (st, s, s)), then ResBlocks at the output width."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, attention: bool, temporal: int, spatial: int):
        super().__init__()
        factors = (temporal, spatial, spatial)
        self.layers = nn.ModuleList([CausalConv3d(c_in, c_out, factors, stride=factors)])
        self.layers.extend(ResBlock(c_out, attention) for _ in range(num_res_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, H, W)
        for layer in self.layers:
            x = layer(x)
        return x  # (B, C_out, (T - 1) // st + 1, H // s, W // s)


class Encoder(nn.Module):
    """Native Mochi VAE encoder: video (B, 3, 6k + 1, H, W) in [-1, 1] -> (mean, logvar), each (B, 12, k + 1, H/8, W/8).

    The Fourier features that native callers add themselves are computed here, in fp32.
    """

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.config = cfg = config
        c, n, attn = cfg.channels, cfg.num_res_blocks, cfg.has_attention
        layers = [Conv1x1(cfg.in_channels, c[0])]
        layers += [ResBlock(c[0], attn[0]) for _ in range(n[0])]
        layers += [
            DownsampleBlock(
                c[i], c[i + 1], n[i + 1], attn[i + 1], cfg.temporal_reductions[i], cfg.spatial_reductions[i]
            )
            for i in range(len(c) - 1)
        ]
        layers += [ResBlock(c[-1], attn[-1]) for _ in range(n[-1])]
        self.layers = nn.ModuleList(layers)
        self.output_norm = GroupNormSpatial(c[-1])
        self.output_proj = Conv1x1(c[-1], 2 * cfg.latent_dim, bias=False)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, 3, T, H, W)
        self.check_input(video)
        x = fourier_features(video, self.config.fourier_exponents)  # (B, 15, T, H, W), fp32
        x = x.to(self.output_proj.weight.dtype)
        for layer in self.layers:
            x = layer(x)  # (B, C, T', H', W')
        x = F.silu(self.output_norm(x), inplace=True)
        mean, logvar = self.output_proj(x).chunk(2, dim=1)  # (B, 12, k + 1, H / 8, W / 8) each
        return mean, logvar

    def check_input(self, video: torch.Tensor) -> None:
        cfg = self.config
        channels = cfg.in_channels // (1 + 2 * len(cfg.fourier_exponents))
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(
                f"the encoder takes video shaped (B, {channels}, T, H, W) with values in [-1, 1]; "
                f"got shape {tuple(video.shape)}"
            )
        if problems := cfg.geometry.problems(*video.shape[2:], names={"num_frames": "T", "height": "H", "width": "W"}):
            raise ValueError(f"the encoder cannot take video shaped {tuple(video.shape)}: " + "; ".join(problems))
