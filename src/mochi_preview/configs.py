"""The registry of model sizes: the published Mochi 1 preview, the shipped demo model and the tiny test models.

Each entry names the sizes of all four parts. Configs read off a checkpoint (`dit.layout.infer_dit_config`, ...)
stay the truth for what is loaded; `check_dit_config` compares them with the entry they claim to be.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .dit.layers import swiglu_hidden_size
from .dit.model import DiTConfig
from .vae.model import DecoderConfig, EncoderConfig


@dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 v1.1 encoder (gated-GELU); the defaults are google/t5-v1_1-xxl's."""

    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_ff: int = 10240


@dataclass(frozen=True)
class ModelConfig:
    """One model: DiT, VAE decoder and encoder, text encoder."""

    dit: DiTConfig
    decoder: DecoderConfig
    encoder: EncoderConfig
    t5: T5Config


def dit_config(depth: int, num_heads: int, dim_y: int, text_dim: int, head_dim: int = 128, **kw) -> DiTConfig:
    """A DiT of the published shape at another size: SwiGLU widths by the native rule (multiples of 256)."""
    hidden_x, hidden_y = swiglu_hidden_size(num_heads * head_dim), swiglu_hidden_size(dim_y)
    return DiTConfig(
        depth=depth, num_heads=num_heads, head_dim=head_dim, dim_y=dim_y, mlp_hidden_x=hidden_x,
        mlp_hidden_y=hidden_y, text_dim=text_dim, **kw,
    )  # fmt: skip


def _vae(channels: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[DecoderConfig, EncoderConfig]:
    """A decoder and an attention-free encoder with the same widths and ResBlock counts."""
    encoder = EncoderConfig(channels=channels, num_res_blocks=blocks, has_attention=(False,) * len(blocks))
    return DecoderConfig(channels=channels, num_res_blocks=blocks), encoder


PUBLISHED = "mochi-1-preview"
CONFIGS: dict[str, ModelConfig] = {
    # The published weights: 10B-parameter DiT, 362M decoder, 97M encoder, T5-XXL.
    "mochi-1-preview": ModelConfig(DiTConfig(), DecoderConfig(), EncoderConfig(), T5Config()),
    # The demo model shipped in assets/demo (trained by `python -m mochi_preview.demo.build`): 3.9M-parameter DiT.
    "demo": ModelConfig(
        dit_config(depth=4, num_heads=3, dim_y=128, text_dim=128, head_dim=64),
        *_vae(channels=(32, 32, 64, 64), blocks=(0, 0, 1, 1, 1)),
        T5Config(d_model=128, num_layers=2, num_heads=4, d_ff=256),
    ),
    # Random tiny models for tests and the fallback model (non-native SwiGLU widths, as reduced checkpoints have).
    "tiny": ModelConfig(
        DiTConfig(depth=2, num_heads=2, head_dim=64, dim_y=64, mlp_hidden_x=256, mlp_hidden_y=128, text_dim=64),
        *_vae(channels=(32, 32, 32, 32), blocks=(1, 1, 1, 1, 1)),
        T5Config(d_model=64, num_layers=2, num_heads=4, d_ff=128),
    ),
}


def find_dit_config(cfg: DiTConfig) -> str | None:
    """The registry entry whose DiT config `cfg` equals, or None (a checkpoint of another size)."""
    return next((name for name, entry in CONFIGS.items() if entry.dit == cfg), None)


def check_dit_config(cfg: DiTConfig, what: str = "DiT checkpoint") -> str | None:
    """The registry entry `cfg` equals, or None; a ValueError when it has the published model's depth and widths
    but differs elsewhere (a damaged or mislabelled checkpoint would otherwise load as a model of its own)."""
    name = find_dit_config(cfg)
    published = CONFIGS[PUBLISHED].dit
    identity = lambda c: (c.depth, c.num_heads, c.head_dim, c.dim_y)
    if name is None and identity(cfg) == identity(published):
        wrong = [f"{f.name}={getattr(cfg, f.name)} (expected {getattr(published, f.name)})"
                 for f in fields(DiTConfig) if getattr(cfg, f.name) != getattr(published, f.name)]  # fmt: skip
        raise ValueError(f"{what} has the depth and widths of {PUBLISHED!r} but differs in {', '.join(wrong)}")
    return name
