"""AsymmDiT: Mochi's joint text/video diffusion transformer, predicting the flow-matching velocity z0 - noise.

Visual tokens (width dim_x) and text tokens (width dim_y) keep separate weights but attend jointly with
dim_x-wide heads; the text stream is projected up for attention and back down after it.

Shapes: B batch, N visual tokens (T * H/2 * W/2, row-major over t, h, w), L text tokens (padded), Lp the longest
valid text count in the batch, H heads of width d, Dx = H * d and Dy the stream widths. Comments give one process's
shapes; under context parallelism (`set_token_layout`, see dit/tokens.py) x holds a share of the N tokens between
attentions, and each attention runs on a share of the heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionKernel, JointAttention
from .layers import (
    AttentionPool,
    FeedForward,
    FinalLayer,
    Linear,
    RMSNorm,
    TimestepEmbedder,
    modulated_rms_norm,
    residual_gated_rms_norm,
)
from .rope import apply_rope, rope_cos_sin, rope_positions
from .tokens import TokenLayout


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of an AsymmDiT; the defaults are the published Mochi 1 preview (other sizes: `configs.dit_config`)."""

    depth: int = 48
    num_heads: int = 24
    head_dim: int = 128
    dim_y: int = 1536  # text stream width
    mlp_hidden_x: int = 8192
    mlp_hidden_y: int = 4096
    text_dim: int = 4096  # T5 feature width
    pool_heads: int = 8
    in_channels: int = 12
    patch_size: int = 2
    timestep_freq_dim: int = 256

    @property
    def dim_x(self) -> int:
        """Visual stream width, also the joint attention width."""
        return self.num_heads * self.head_dim


def split_heads(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, 3 H d) laid out [q | k | v] -> (3, B, S, H, d), a view: unpacks into q, k, v."""
    return rearrange(qkv, "b s (three h d) -> three b s h d", three=3, d=head_dim)


class AsymmetricAttention(nn.Module):
    """Joint attention with separate qkv/out projections per stream; QK RMSNorm; RoPE on visual tokens only."""

    def __init__(self, cfg: DiTConfig, update_y: bool):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_x = Linear(cfg.dim_x, 3 * cfg.dim_x, bias=False)
        self.qkv_y = Linear(cfg.dim_y, 3 * cfg.dim_x, bias=False)  # text projected up to the visual width
        self.q_norm_x = RMSNorm(cfg.head_dim)
        self.k_norm_x = RMSNorm(cfg.head_dim)
        self.q_norm_y = RMSNorm(cfg.head_dim)
        self.k_norm_y = RMSNorm(cfg.head_dim)
        self.proj_x = Linear(cfg.dim_x, cfg.dim_x)
        self.proj_y = Linear(cfg.dim_x, cfg.dim_y) if update_y else None  # the last block's text output is unused

    def forward(self, x, y, rope, attn: JointAttention, layout: TokenLayout):
        """x (B, N, Dx), y (B, L, Dy), rope (cos, sin) -> x_attn (B, N, Dx), y_attn (B, L, Dy) or None (last block).

        q, k and v are laid out (B, S, H, d), token-major: what flash-attn takes as it is (SDPA takes views).
        """
        n = rope[0].shape[0]  # N: the RoPE tables cover every visual token
        q_x, k_x, v_x = split_heads(layout.tokens_to_heads(self.qkv_x(x), n), self.head_dim)  # (B, N, H, d) each
        qkv_y = self.qkv_y(attn.gather(y))  # (B, Lp, 3 Dx): the valid text tokens only
        q_y, k_y, v_y = (layout.local_heads(t, dim=2) for t in split_heads(qkv_y, self.head_dim))  # (B, Lp, H, d) each

        q = torch.cat([apply_rope(self.q_norm_x(q_x), *rope), self.q_norm_y(q_y)], dim=1)  # (B, N + Lp, H, d)
        k = torch.cat([apply_rope(self.k_norm_x(k_x), *rope), self.k_norm_y(k_y)], dim=1)  # (B, N + Lp, H, d)
        v = torch.cat([v_x, v_y], dim=1)  # (B, N + Lp, H, d)
        out = attn(q, k, v).flatten(2)  # (B, N + Lp, Dx)

        x_attn = self.proj_x(layout.heads_to_tokens(out[:, :n]))  # (B, N, Dx)
        if self.proj_y is None:
            return x_attn, None
        out_y = attn.scatter(layout.gather_heads(out[:, n:]))  # (B, L, Dx), zeros at padding positions
        return x_attn, self.proj_y(out_y)  # (B, L, Dy): padding rows hold proj_y's bias, as in the reference


class AsymmetricJointBlock(nn.Module):
    """One joint block: scale-only modulation, joint attention, SwiGLU, each closed by a tanh-gated RMS norm.

    The last block (update_y=False) leaves the text stream alone, but its text keys and values still serve attention.
    """

    def __init__(self, cfg: DiTConfig, update_y: bool):
        super().__init__()
        self.update_y = update_y
        self.mod_x = Linear(cfg.dim_x, 4 * cfg.dim_x)
        self.mod_y = Linear(cfg.dim_x, (4 if update_y else 1) * cfg.dim_y)
        self.attn = AsymmetricAttention(cfg, update_y)
        self.mlp_x = FeedForward(cfg.dim_x, cfg.mlp_hidden_x)
        self.mlp_y = FeedForward(cfg.dim_y, cfg.mlp_hidden_y) if update_y else None

    def forward(self, x, y, c_act, rope, attn: JointAttention, layout: TokenLayout, c_act_y=None, frames=None):
        """x (B, N, Dx), y (B, L, Dy), c_act = silu(c) (B, Dx) -> updated x, y.

        Per latent frame (see `AsymmDiT.conditioning`): c_act (B, T, Dx), `frames` (N,) the frame of each visual
        token and c_act_y (B, Dx) the text stream's input.
        """
        mod_x = self.mod_x(c_act)  # (B, 4 Dx), or (B, T, 4 Dx) per frame
        if frames is not None:
            mod_x = mod_x[:, frames]  # (B, N, 4 Dx): each token its frame's
        scale_msa_x, gate_msa_x, scale_mlp_x, gate_mlp_x = mod_x.chunk(4, dim=-1)  # (B, Dx) or (B, N, Dx) each
        c_act_y = c_act if c_act_y is None else c_act_y  # (B, Dx)
        if self.update_y:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = self.mod_y(c_act_y).chunk(4, dim=-1)  # (B, Dy) each
        else:
            scale_msa_y = self.mod_y(c_act_y)  # (B, Dy): the last block only modulates the text it attends with

        x_in, y_in = modulated_rms_norm(x, scale_msa_x), modulated_rms_norm(y, scale_msa_y)
        x_attn, y_attn = self.attn(x_in, y_in, rope, attn, layout)
        x = residual_gated_rms_norm(x, x_attn, gate_msa_x)  # (B, N, Dx)
        x = residual_gated_rms_norm(x, self.mlp_x(modulated_rms_norm(x, scale_mlp_x)), gate_mlp_x)
        if self.update_y:
            y = residual_gated_rms_norm(y, y_attn, gate_msa_y)  # (B, L, Dy)
            y = residual_gated_rms_norm(y, self.mlp_y(modulated_rms_norm(y, scale_mlp_y)), gate_mlp_y)
        return x, y


class AsymmDiT(nn.Module):
    """The Mochi DiT: `dit(latents, sigma, text_features, text_mask)` -> velocity, all in DiT latent space.

    sigma is one noise level per video (B,), or one per latent frame (B, T) for models trained that way (Pusa).
    """

    def __init__(self, cfg: DiTConfig, attention_backend: str = "sdpa", attention_chunk: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.attention = AttentionKernel(attention_backend, attention_chunk)
        self.token_layout = TokenLayout()  # all tokens in this process; see set_token_layout
        p = cfg.patch_size
        self.x_embedder = nn.Module()  # holds `proj`, so the parameter names match the native checkpoint's
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, cfg.dim_x, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(cfg.dim_x, cfg.timestep_freq_dim)
        self.t5_y_embedder = AttentionPool(cfg.text_dim, cfg.pool_heads, cfg.dim_x)
        self.t5_yproj = Linear(cfg.text_dim, cfg.dim_y)
        self.pos_frequencies = nn.Parameter(torch.zeros(3, cfg.num_heads, cfg.head_dim // 2))  # learned RoPE
        self.blocks = nn.ModuleList(AsymmetricJointBlock(cfg, update_y=i < cfg.depth - 1) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.dim_x, p * p * cfg.in_channels)
        self._positions: tuple | None = None  # (grid key, (N, 3) positions on the device): see rope_tables
        # Training: keep only each block's inputs for the backward pass and recompute the rest (same gradients).
        self.gradient_checkpointing = False

    def set_attention(self, backend: str = "auto", chunk: int | None = None) -> AsymmDiT:
        """Choose the attention kernel at run time ("auto", "sdpa", "flash", "sage") and SDPA's query chunk; the
        backend itself is resolved at the first forward on each (device, dtype), or by `resolve_attention`."""
        self.attention = AttentionKernel(backend, chunk)
        return self

    def resolve_attention(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
        """Resolve the attention backend now (default: where the weights are, in the compute dtype), e.g. right
        after loading, so that an explicit backend that cannot run fails before any work; -> the backend."""
        device = self.t5_yproj.weight.device if device is None else device
        return self.attention.resolve(device, dtype or self.dtype, self.cfg.head_dim)

    @property
    def attention_backend_in_use(self) -> str:
        """The attention backend the latest forward ran ("sdpa", "flash" or "sage"), for the record; before any
        forward, the one `resolve_attention()` gives."""
        return self.attention.in_use or self.resolve_attention()

    def set_token_layout(self, layout: TokenLayout | None = None) -> AsymmDiT:
        """Share each forward's tokens with other processes (`distributed.ContextParallel.token_layout()`), or
        with None keep them all in this process."""
        self.token_layout = layout if layout is not None else TokenLayout()
        return self

    def compile_blocks(self, **compile_kwargs) -> AsymmDiT:
        """Opt in to torch.compile for every block and the final layer (fuses the norm, RoPE and gating work around
        the matmuls); the first call per shape compiles. Weights and state-dict keys are unchanged."""
        for module in [*self.blocks, self.final_layer]:
            module.compile(**compile_kwargs)
        return self

    def rope_tables(self, t: int, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin), each (N, H, d/2) fp32, for a latent grid, from the frequencies as they are now.

        Recomputed every forward, never cached: a cache keyed on the parameter misses writes through `.data`
        (which do not bump `_version`), and a checksum key would cost a host synchronisation per forward. The
        cost is small. Measured on 2 CPU threads: 0.6 ms against a 199 ms forward of the demo model (0.3%); at the
        published size (163 frames at 848x480: 44,520 tokens x 24 heads x 64, 0.51 GiB of tables) 0.93 s, against
        CPU forwards of hours. On a GPU (estimated, not measured): about 1.1 GB of memory traffic, under a
        millisecond at H100/H200 bandwidth, against a forward of 2.8 s or more. Between forwards the tables are
        not held: only the (N, 3) positions, which depend on the grid alone (`release_tables` drops them).
        Under training the tables are part of the autograd graph.
        """
        key = (t, rows, cols, torch.device(device))
        if self._positions is None or self._positions[0] != key:
            with torch.inference_mode(False):  # a tensor made in inference mode could never serve training
                self._positions = (key, rope_positions(t, rows, cols).to(device))
        return rope_cos_sin(self.pos_frequencies, self._positions[1])

    def release_tables(self) -> AsymmDiT:
        """Drop what the forwards of a generation keep on the device (the RoPE positions); call after generating."""
        self._positions = None
        return self

    def fp32_parameter_names(self) -> list[str]:
        """Parameters kept in fp32 whatever the compute dtype: RoPE frequencies and QK-norm weights."""
        return [n for n, _ in self.named_parameters() if n == "pos_frequencies" or "_norm_" in n]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the weights outside the fp32 ones."""
        return self.t5_yproj.weight.dtype

    def conditioning(self, sigma, text_features, text_mask, tokens_per_frame: int):
        """The blocks' modulation inputs -> (c_act, c_act_y, frames), c = timestep embedding + pooled caption.

        One sigma per video (B,): c_act = silu(c) (B, Dx) serves both streams; c_act_y and frames are None.
        One per latent frame (B, T): c_act = silu(c) (B, T, Dx) for the visual tokens, each token taking its frame's
        (`frames` (N,): the frame of each of this process's tokens); the text stream takes silu of the mean of c
        over the frames (the mean before the SiLU, as Pusa V0.5 was trained), c_act_y (B, Dx).
        """
        pooled = self.t5_y_embedder(text_features, text_mask)  # (B, Dx)
        if sigma.ndim == 1:
            return F.silu(self.t_embedder(sigma) + pooled), None, None  # (B, Dx)
        b, t = sigma.shape
        c = self.t_embedder(sigma.flatten()).unflatten(0, (b, t)) + pooled[:, None]  # (B, T, Dx)
        c_act_y = F.silu(c.float().mean(dim=1).to(c.dtype))  # (B, Dx)
        frames = torch.arange(t, device=sigma.device).repeat_interleave(tokens_per_frame)  # (N,) in token order
        frames = self.token_layout.split_tokens(frames[None, :, None])[0, :, 0]  # (N,): this process's share
        return F.silu(c), c_act_y, frames  # (B, T, Dx), (B, Dx), (N,)

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor | float,
        text_features: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents (B, C, T, H, W), sigma (B,) or (B, T) in [0, 1], text (B, L, Dt), mask (B, L) -> velocity
        (B, C, T, H, W). Per-frame sigmas that are all equal take the one-sigma path: the same velocity, bit for bit.
        """
        b, _, t, h, w = self._check_inputs(latents, text_features, text_mask)
        sigma = self._check_sigma(sigma, b, t, latents.device)  # (B,), or (B, T) when the frames' sigmas differ
        if text_mask is None:
            text_mask = torch.ones(text_features.shape[:2], dtype=torch.bool, device=latents.device)
        p, dtype = self.cfg.patch_size, self.dtype
        rows, cols = h // p, w // p
        layout = self.token_layout

        frames = rearrange(latents.to(dtype), "b c t h w -> (b t) c h w")
        x = rearrange(self.x_embedder.proj(frames), "(b t) d h w -> b (t h w) d", b=b)  # (B, N, Dx)
        x = layout.split_tokens(x)  # (B, N, Dx): this process's share of the tokens
        c_act, c_act_y, token_frames = self.conditioning(sigma, text_features, text_mask, rows * cols)  # see there
        y = self.t5_yproj(text_features.to(dtype))  # (B, L, Dy)
        # Once per forward for every block: the backend for q, k, v's dtype (that of [x; y]), the text packing.
        attn_dtype = torch.promote_types(x.dtype, y.dtype)
        attn = self.attention.plan(text_mask, t * rows * cols, x.device, attn_dtype, self.cfg.head_dim)
        rope = self.rope_tables(t, rows, cols, latents.device)  # (cos, sin), each (N, H, d/2) fp32
        rope = tuple(layout.local_heads(r, dim=1) for r in rope)  # this process's heads

        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            args = (x, y, c_act, rope, attn, layout, c_act_y, token_frames)  # x (B, N, Dx), y (B, L, Dy)
            x, y = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)

        x = self.final_layer(x, c_act, token_frames)  # (B, N, p*p*C)
        x = layout.gather_tokens(x, num_tokens=t * rows * cols)  # (B, N, p*p*C): every process's tokens
        v = rearrange(x, "b (t h w) (p1 p2 c) -> b c t (h p1) (w p2)", t=t, h=rows, w=cols, p1=p, p2=p)
        return v.float()  # (B, C, T, H, W)

    @staticmethod
    def _check_sigma(sigma, b: int, t: int, device) -> torch.Tensor:
        """A number, (B,) or (B, T) -> fp32 (B,), or (B, T) when the frames' sigmas differ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
        if sigma.ndim < 2:
            return sigma.expand(b)
        if sigma.ndim > 2 or sigma.shape[0] not in (1, b) or sigma.shape[1] != t:
            raise ValueError(
                f"sigma must be a number, ({b},) or ({b}, {t}) (one per latent frame); got {tuple(sigma.shape)}"
            )
        sigma = sigma.expand(b, t)
        # Equal over the frames: the one-sigma path. (The check reads one bool back from the device.)
        return sigma[:, 0] if bool((sigma == sigma[:, :1]).all()) else sigma

    def _check_inputs(self, latents, text_features, text_mask):
        """Explain wrong shapes before they fail deep inside a block; -> (B, C, T, H, W)."""
        cfg = self.cfg
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, {cfg.in_channels}, T, H, W); got {tuple(latents.shape)}")
        b, _, t, h, w = latents.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"latent height and width must be multiples of the patch size {cfg.patch_size} (pixel sizes "
                f"multiples of {8 * cfg.patch_size}); got latent {h}x{w}"
            )
        if text_features.ndim != 3 or text_features.shape[0] != b or text_features.shape[2] != cfg.text_dim:
            raise ValueError(f"text_features must be ({b}, L, {cfg.text_dim}); got {tuple(text_features.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text_features.shape[:2]):
            raise ValueError(f"text_mask must be {tuple(text_features.shape[:2])}; got {tuple(text_mask.shape)}")
        return b, cfg.in_channels, t, h, w


def init_weights(model: AsymmDiT, std: float = 0.02, generator: torch.Generator | None = None) -> AsymmDiT:
    """Random weights for a fresh model (tests, training from scratch): the one place weights are initialised."""
    for name, param in model.named_parameters():
        with torch.no_grad():
            if "_norm_" in name:
                param.fill_(1.0)
            elif name == "pos_frequencies":
                # Spread frequencies over a useful range of wavelengths, random per head and axis.
                param.copy_(torch.rand(param.shape, generator=generator) * 0.5)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
    return model
