"""Loading the VAE decoder and encoder from native files or a diffusers `vae/` folder, shape inferred from tensors.

Accepted `path`s: a `decoder.safetensors` / `encoder.safetensors` file (native keys, optionally prefixed with
`decoder.` / `encoder.`), a model folder holding them, a diffusers `vae/` folder (`AutoencoderKLMochi`, both halves
in one file), or a model folder holding `vae/`. Weights may be fp32 or bf16; they are cast tensor by tensor to the
requested dtype, except the group norms' affine parameters, which stay fp32 (the norms compute in fp32).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    SafetensorsReader,
    Source,
    concat_rows,
    load_module,
    native_shapes,
    open_checkpoint,
)
from .layers import GroupNormSpatial
from .model import Decoder, DecoderConfig, Encoder, EncoderConfig

NATIVE_MARKER = {"decoder": "blocks.0.0.weight", "encoder": "layers.0.weight"}
DIFFUSERS_MARKER = {"decoder": "conv_in.weight", "encoder": "proj_in.weight"}


def open_vae_checkpoint(path: str | Path, part: str) -> tuple[SafetensorsReader, dict[str, Source], dict, str]:
    """Find and open the `part` ("decoder" or "encoder") weights under `path`.

    Returns (reader, layout, diffusers_config, layout name): `reader` named without any `decoder.`/`encoder.` prefix,
    `layout` mapping native key -> source over those names, and the diffusers config.json contents ({} for native
    files).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    if path.is_dir():
        if (path / f"{part}.safetensors").is_file():
            path = path / f"{part}.safetensors"
        elif (path / "vae").is_dir():
            path = path / "vae"
        elif any((path / f"{name}.safetensors").is_file() for name in ("dit", "encoder", "decoder")):
            raise CheckpointError(f"no {part}.safetensors in the model folder {path}")
    config = {}
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
    reader = open_checkpoint(path)
    if any(k.startswith(f"{part}.") for k in reader.keys()):
        reader = reader.select(f"{part}.")
    if NATIVE_MARKER[part] in reader:
        return reader, {}, config, "native"
    if DIFFUSERS_MARKER[part] in reader:
        return reader, diffusers_layout(reader.keys(), part), config, "diffusers"
    other = "encoder" if part == "decoder" else "decoder"
    hint = ""
    if NATIVE_MARKER[other] in reader or any(k.startswith(f"{other}.") for k in reader.keys()):
        hint = f" It looks like a VAE {other}."
    sample = ", ".join(sorted(reader.keys())[:3])
    raise CheckpointError(
        f"{path} does not hold a Mochi VAE {part}: expected native keys such as {NATIVE_MARKER[part]!r} or "
        f"diffusers keys such as '{part}.{DIFFUSERS_MARKER[part]}'; found keys like {sample}.{hint}"
    )


def has_vae_part(path: str | Path, part: str) -> bool:
    """Whether the model folder `path` holds the VAE `part`: its native file, or `part.` keys in a diffusers vae/."""
    path = Path(path)
    if (path / f"{part}.safetensors").is_file():
        return True
    return (path / "vae").is_dir() and any(k.startswith(f"{part}.") for k in open_checkpoint(path / "vae").keys())


# ---------------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKLMochi names <-> native names: one table, read in both directions

_RESNET = {  # native ResBlock sequential index -> diffusers MochiResnetBlock3D module
    "stack.0": "norm1.norm_layer",
    "stack.2": "conv1.conv",
    "stack.3": "norm2.norm_layer",
    "stack.5": "conv2.conv",
}


def _module_table(part: str, n_in: int, n_blocks: int, depth: int) -> dict[str, tuple[str, ...]]:
    """Native module -> its diffusers module(s), for ResBlock indices below `depth`.

    `n_in`: ResBlocks before the first resampling block (the encoder's layer numbering depends on it); `n_blocks`:
    resampling blocks. The native attention's qkv maps to three modules (to_q, to_k, to_v: its row thirds).
    """
    if part == "decoder":
        table = {"blocks.0.0": ("conv_in",), "output_proj": ("proj_out",)}
        table |= {f"blocks.{b + 1}.proj": (f"up_blocks.{b}.proj",) for b in range(n_blocks)}
        levels = [("block_in", lambda i: f"blocks.0.{i + 1}")]
        levels += [(f"up_blocks.{b}", lambda i, b=b: f"blocks.{b + 1}.blocks.{i}") for b in range(n_blocks)]
        levels += [("block_out", lambda i: f"blocks.{n_blocks + 1}.{i}")]
    else:
        table = {"layers.0": ("proj_in",), "output_proj": ("proj_out",), "output_norm": ("norm_out.norm_layer",)}
        first = n_in + 1  # the first downsampling layer
        table |= {f"layers.{first + b}.layers.0": (f"down_blocks.{b}.conv_in.conv",) for b in range(n_blocks)}
        levels = [("block_in", lambda i: f"layers.{i + 1}")]
        levels += [(f"down_blocks.{b}", lambda i, b=b: f"layers.{first + b}.layers.{i + 1}") for b in range(n_blocks)]
        levels += [("block_out", lambda i: f"layers.{first + n_blocks + i}")]
    for block, native in levels:
        for i in range(depth):
            for stack, name in _RESNET.items():
                table[f"{native(i)}.{stack}"] = (f"{block}.resnets.{i}.{name}",)
            table[f"{native(i)}.attn_block.norm"] = (f"{block}.norms.{i}.norm_layer",)
            table[f"{native(i)}.attn_block.attn.out"] = (f"{block}.attentions.{i}.to_out.0",)
            table[f"{native(i)}.attn_block.attn.qkv"] = tuple(f"{block}.attentions.{i}.to_{x}" for x in "qkv")
    return table


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _depth(keys) -> int:
    """One more than the largest index in any key: a bound on the ResBlocks per level."""
    return 1 + max((int(n) for k in keys for n in k.split(".") if n.isdigit()), default=0)


def diffusers_layout(keys: list[str], part: str) -> dict[str, Source]:
    """Native key -> source over diffusers keys (without the part prefix); unknown keys are left out (unexpected)."""
    n_in = _count(keys, r"^block_in\.resnets\.(\d+)\.")
    n_blocks = _count(keys, r"^(?:up|down)_blocks\.(\d+)\.")
    present, layout = set(keys), {}
    for native, modules in _module_table(part, n_in, n_blocks, _depth(keys)).items():
        for param in ("weight", "bias"):
            sources = tuple(f"{m}.{param}" for m in modules)
            if all(s in present for s in sources):
                layout[f"{native}.{param}"] = Source(sources, concat_rows if len(sources) > 1 else None)
    return layout


def _native_counts(keys: list[str], part: str) -> tuple[int, int]:
    """(n_in, n_blocks) of `_module_table` from native keys."""
    if part == "decoder":
        return _count(keys, r"^blocks\.0\.([1-9]\d*)\."), _count(keys, r"^blocks\.(\d+)\.proj\.")
    downs = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^layers\.(\d+)\.layers\.0\.", k))})
    return (downs[0] - 1 if downs else 0), len(downs)


def to_diffusers_state(state: Mapping[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """A native decoder's or encoder's tensors under diffusers' `AutoencoderKLMochi` names (`decoder.` / `encoder.`
    prefixed): the inverse of `diffusers_layout`, from the same table."""
    keys = list(state)
    table = _module_table(part, *_native_counts(keys, part), _depth(keys))
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            raise CheckpointError(f"the VAE {part}'s tensor {key!r} has no name in diffusers' AutoencoderKLMochi")
        for name, piece in zip(table[module], tensor.detach().cpu().chunk(len(table[module]))):
            out[f"{part}.{name}.{param}"] = piece.contiguous()
    return out


def diffusers_vae_problems(decoder: DecoderConfig, encoder: EncoderConfig | None) -> list[str]:
    """What diffusers' `AutoencoderKLMochi` cannot describe about this VAE (empty: it loads it).

    It shares `layers_per_block` and the expansion factors between its halves, has no attention in the decoder and
    takes RGB with the Fourier features at 2^6 and 2^7.
    """
    problems = [f"the decoder has attention {decoder.has_attention}"] if any(decoder.has_attention) else []
    if encoder is not None:
        pairs = {
            "ResBlocks per level": (encoder.num_res_blocks, decoder.num_res_blocks),
            "temporal factors": (encoder.temporal_reductions, decoder.temporal_expansions),
            "spatial factors": (encoder.spatial_reductions, decoder.spatial_expansions),
            "latent channels": (encoder.latent_dim, decoder.latent_dim),
            "Fourier exponents": (encoder.fourier_exponents, (6, 7)),
        }
        problems += [f"the encoder's {what} are {a}, the decoder's {b}" for what, (a, b) in pairs.items() if a != b]
    return problems


def diffusers_vae_config(decoder: DecoderConfig, encoder: EncoderConfig | None, latents_mean, latents_std) -> dict:
    """diffusers' vae/config.json for this decoder (and encoder; see `diffusers_vae_problems` for what it cannot
    describe: the decoder's values are written then)."""
    encoder = encoder or EncoderConfig(channels=decoder.channels, num_res_blocks=decoder.num_res_blocks)  # unwritten
    return {
        "_class_name": "AutoencoderKLMochi",
        "act_fn": "silu",
        "add_attention_block": list(encoder.has_attention),
        "decoder_block_out_channels": list(decoder.channels),
        "encoder_block_out_channels": list(encoder.channels),
        "in_channels": 15,
        "latent_channels": decoder.latent_dim,
        "latents_mean": [float(x) for x in latents_mean],
        "latents_std": [float(x) for x in latents_std],
        "layers_per_block": list(decoder.num_res_blocks),
        "out_channels": decoder.out_channels,
        "scaling_factor": 1.0,
        "spatial_expansions": list(decoder.spatial_expansions),
        "temporal_expansions": list(decoder.temporal_expansions),
    }


# ---------------------------------------------------------------------------------------------------------------
# Config inference from native tensor shapes


def _indices(shapes: Mapping[str, torch.Size], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def _need(shapes: Mapping[str, torch.Size], key: str, what: str) -> torch.Size:
    if key not in shapes:
        raise CheckpointError(f"the {what} checkpoint has no tensor {key!r}, which gives the model's shape")
    return shapes[key]


def _level(shapes: Mapping[str, torch.Size], prefix: str) -> tuple[int, bool]:
    """Number of ResBlocks directly under `prefix` and whether they have attention."""
    blocks = _indices(shapes, rf"^{re.escape(prefix)}\.(\d+)\.stack\.")
    attention = any(re.match(rf"^{re.escape(prefix)}\.\d+\.attn_block\.", k) for k in shapes)
    return len(blocks), attention


def _split_expansion(product: int) -> tuple[int, int]:
    """(temporal, spatial) with temporal * spatial^2 = product: spatial 2 whenever possible (Mochi's 8x8 = 2*2*2)."""
    return (product // 4, 2) if product % 4 == 0 else (product, 1)


def infer_decoder_config(
    shapes: Mapping[str, torch.Size],
    temporal_expansions: tuple[int, ...] | None = None,
    spatial_expansions: tuple[int, ...] | None = None,
) -> DecoderConfig:
    """The decoder's shape from its native tensor shapes.

    Widths, block counts and attention are read from the tensors. Each upsampling projection only tells the product
    st * s^2 of its factors: unless the factors are given, s = 2 when the product allows it, as in every Mochi VAE.
    """
    conv_in = _need(shapes, "blocks.0.0.weight", "decoder")
    out = _need(shapes, "output_proj.weight", "decoder")
    # blocks.0: input conv + ResBlocks; blocks.1..N: upsampling (proj, blocks.*); blocks.N+1: ResBlocks (maybe none).
    ups = _indices(shapes, r"^blocks\.(\d+)\.(?:proj|blocks)\.")
    top = _indices(shapes, r"^blocks\.(\d+)\.")
    n_up = len(ups)
    if ups != list(range(1, n_up + 1)) or not set(top) <= set(range(n_up + 2)):
        raise CheckpointError(
            f"the decoder checkpoint's upsampling blocks are {ups} among blocks {top}; expected blocks.0, then "
            "upsampling blocks 1 to N without gaps, then at most blocks.N+1"
        )
    projs = [_need(shapes, f"blocks.{b}.proj.weight", "decoder") for b in range(1, n_up + 1)]
    widths = [conv_in[0]] + [p[1] for p in projs[1:]] + [out[1]]  # latent side first
    levels = [_level(shapes, "blocks.0")]
    levels += [_level(shapes, f"blocks.{b}.blocks") for b in range(1, n_up + 1)]
    levels += [_level(shapes, f"blocks.{n_up + 1}")]
    products = []
    for b, (proj, width) in enumerate(zip(projs, widths[1:]), start=1):
        if proj[0] % width:
            raise CheckpointError(
                f"blocks.{b}.proj.weight has {proj[0]} rows, not a multiple of the next width {width}"
            )
        products.append(proj[0] // width)
    if temporal_expansions is None or spatial_expansions is None:
        split = [_split_expansion(p) for p in products]
        temporal = tuple(t for t, _ in split)[::-1]
        spatial = tuple(s for _, s in split)[::-1]
        temporal_expansions = temporal_expansions or temporal
        spatial_expansions = spatial_expansions or spatial
    temporal_expansions, spatial_expansions = tuple(temporal_expansions), tuple(spatial_expansions)
    given = [t * s * s for t, s in zip(temporal_expansions[::-1], spatial_expansions[::-1])]
    if given != products or len(temporal_expansions) != n_up:
        raise CheckpointError(
            f"temporal_expansions {temporal_expansions} and spatial_expansions {spatial_expansions} do not match "
            f"the upsampling projections, whose st*s^2 are {products[::-1]} (pixel side first)"
        )
    return DecoderConfig(
        latent_dim=conv_in[1],
        out_channels=out[0],
        channels=tuple(widths[::-1]),
        num_res_blocks=tuple(n for n, _ in levels[::-1]),
        temporal_expansions=temporal_expansions,
        spatial_expansions=spatial_expansions,
        has_attention=tuple(a for _, a in levels[::-1]),
    )


def infer_encoder_config(shapes: Mapping[str, torch.Size]) -> EncoderConfig:
    """The encoder's shape from its native tensor shapes (strided convs give the reduction factors directly)."""
    proj_in = _need(shapes, "layers.0.weight", "encoder")
    out = _need(shapes, "output_proj.weight", "encoder")
    top = _indices(shapes, r"^layers\.(\d+)\.")
    if top != list(range(len(top))):
        raise CheckpointError(f"the encoder checkpoint's layers are {top}; expected layers 0 to N without gaps")
    downs = [i for i in top if f"layers.{i}.layers.0.weight" in shapes]
    if not downs or downs != list(range(downs[0], downs[-1] + 1)):
        raise CheckpointError(f"the encoder checkpoint's downsampling layers are {downs}; expected a contiguous run")
    first, last = list(range(1, downs[0])), list(range(downs[-1] + 1, len(top)))
    attention = [any(re.match(rf"^layers\.{i}\.attn_block\.", k) for k in shapes) for i in first + last]
    levels = [(len(first), any(attention[: len(first)]))]
    temporal, spatial, channels = [], [], [proj_in[0]]
    for i in downs:
        c_out, _, kt, kh, kw = shapes[f"layers.{i}.layers.0.weight"]
        if kh != kw:
            raise CheckpointError(f"layers.{i}.layers.0.weight has a non-square spatial kernel {kh}x{kw}")
        temporal.append(kt)
        spatial.append(kh)
        channels.append(c_out)
        levels.append(_level(shapes, f"layers.{i}.layers"))
    levels.append((len(last), any(attention[len(first) :])))
    if proj_in[1] != 15:
        raise CheckpointError(
            f"layers.0.weight takes {proj_in[1]} input channels; the native encoder takes 15 (RGB and its "
            "Fourier features at 2^6 and 2^7)"
        )
    return EncoderConfig(
        in_channels=proj_in[1],
        channels=tuple(channels),
        num_res_blocks=tuple(n for n, _ in levels),
        temporal_reductions=tuple(temporal),
        spatial_reductions=tuple(spatial),
        has_attention=tuple(a for _, a in levels),
        latent_dim=out[0] // 2,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _load(
    module: nn.Module, reader: SafetensorsReader, layout: dict[str, Source], dtype: torch.dtype, device, what: str
) -> nn.Module:
    fp32_names = [  # the group norms compute in fp32
        f"{name}.{p}"
        for name, m in module.named_modules()
        if isinstance(m, GroupNormSpatial)
        for p in ("weight", "bias")
    ]
    load_module(module, reader, layout, dtype, device, fp32_names, what=what)
    return module.eval().requires_grad_(False)


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type such as torch.float32 or torch.bfloat16, not {dtype}")


def load_vae_decoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    temporal_expansions: tuple[int, ...] | None = None,
    spatial_expansions: tuple[int, ...] | None = None,
) -> Decoder:
    """The VAE decoder, shape inferred from the weights; call it as `decoder(z)` on raw VAE-space latents.

    The expansion factors are read from a diffusers config.json when there is one; native files only give the
    product st*s^2 per stage, split with s = 2 unless `temporal_expansions`/`spatial_expansions` say otherwise.
    """
    _check_dtype(dtype)
    reader, layout, config, name = open_vae_checkpoint(path, "decoder")
    temporal_expansions = temporal_expansions or config.get("temporal_expansions")
    spatial_expansions = spatial_expansions or config.get("spatial_expansions")
    cfg = infer_decoder_config(native_shapes(reader, layout), temporal_expansions, spatial_expansions)
    with torch.device("meta"):
        decoder = Decoder(cfg)
    return _load(decoder, reader, layout, dtype, device, f"VAE decoder checkpoint {path} ({name})")


def load_vae_encoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Encoder:
    """The VAE encoder, shape inferred from the weights; `encoder(video)` -> (mean, logvar)."""
    _check_dtype(dtype)
    reader, layout, _, name = open_vae_checkpoint(path, "encoder")
    cfg = infer_encoder_config(native_shapes(reader, layout))
    with torch.device("meta"):
        encoder = Encoder(cfg)
    return _load(encoder, reader, layout, dtype, device, f"VAE encoder checkpoint {path} ({name})")
