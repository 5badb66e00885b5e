"""Estimated time and peak GPU memory of one Mochi 1 preview video on one H100 SXM, per memory mode of this package.

Nothing runs on a GPU. FLOPs and bytes come from the published shapes (the spec, /work/shared/spec/mochi-1.md, cited
as "spec §n"), from this package's code paths (pipeline.py offload modes, dit/ activations, vae/decode.py memory
estimate) and from H100 assumptions stated in the output, each with a low-high range.

    python bench/estimate_h100.py [--output bench/H100_ESTIMATE.md] [--no-write]

prints the markdown report and writes it (atomically) to --output.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from mochi_preview.configs import CONFIGS
from mochi_preview.dit import DiTConfig
from mochi_preview.vae import DecoderConfig, estimate_decode_bytes, plan_decode
from mochi_preview.vae.decode import DEFAULT_BUDGET_FRACTION, RESBLOCK_FACTOR, default_tiles, output_bytes, tile_spans

vae_decode = importlib.import_module("mochi_preview.vae.decode")  # the module (the package exports the function)

GB = 1e9
FRAMES = (31, 85, 163)
HEIGHT, WIDTH = 480, 848
STEPS = 64
TEXT_LEN = 256  # T5 tokens (spec §4.1)
TEXT_VALID = 40  # valid T5 tokens of the positive prompt (assumption); the empty negative prompt has 0 (spec §4.2)
OVERLAP = 8  # latent pixels shared by neighbouring VAE tiles (package default)

PEAK_BF16 = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
PEAK_FP32 = 67e12  # H100 SXM fp32 (no tensor cores) FLOP/s, for T5 in fp32
HBM = 3.35e12  # H100 SXM HBM3 bytes/s
CAPACITY = 80 * GB  # H100 SXM memory
T5_ACTIVATIONS = 0.1 * GB  # 2 prompts x 256 tokens through T5-XXL: tens of MB (assumption, rounded up)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and parameter counts


DIT = CONFIGS["mochi-1-preview"].dit  # the published sizes (spec §1.1, §1.5)
DECODER = CONFIGS["mochi-1-preview"].decoder


def _block_matrices(s, update_y: bool) -> list[tuple[int, int, bool]]:
    """(in, out, bias) of every linear in one joint block (spec §1.3-1.5); the last block has no text MLP/proj_y."""
    dx, dy, hx, hy = s.dim_x, s.dim_y, s.mlp_hidden_x, s.mlp_hidden_y
    mats = [(dx, 4 * dx, True), (dx, (4 if update_y else 1) * dy, True), (dx, 3 * dx, False), (dy, 3 * dx, False)]
    mats += [(dx, dx, True), (dx, 2 * hx, False), (hx, dx, False)]
    if update_y:
        mats += [(dx, dy, True), (dy, 2 * hy, False), (hy, dy, False)]
    return mats


def dit_parameters(s) -> dict[str, int]:
    """Parameter counts: total, block linear weights (the fp8 candidates), the largest block, the rest, fp32-kept."""
    dx, dy, td, p2c = s.dim_x, s.dim_y, s.text_dim, s.patch_size**2 * s.in_channels
    lin = lambda i, o: i * o + o  # noqa: E731
    rest = dx * p2c + dx + lin(s.timestep_freq_dim, dx) + lin(dx, dx)  # patch embed, timestep MLP
    rest += lin(td, 2 * td) + lin(td, td) + lin(td, dx) + lin(td, dy)  # caption pool, t5_yproj
    rest += 3 * s.num_heads * s.head_dim // 2 + lin(dx, 2 * dx) + lin(dx, p2c)  # pos_frequencies, final layer
    blocks, weights = [], 0
    for i in range(s.depth):
        mats = _block_matrices(s, update_y=i < s.depth - 1)
        w = sum(a * b for a, b, _ in mats)
        weights += w
        blocks.append(w + sum(b for _, b, bias in mats if bias) + 4 * s.head_dim)  # + 4 QK-norm weights
    fp32 = 3 * s.num_heads * s.head_dim // 2 + 4 * s.head_dim * s.depth  # kept fp32 (spec §1.8)
    total = rest + sum(blocks)
    return {"total": total, "block_weights": weights, "block_max": max(blocks), "rest": rest, "fp32": fp32}


def dit_bytes(s, dtype: str) -> dict[str, float]:
    """Bytes of the whole DiT, its largest block and the non-block rest: fp32, bf16 (norm weights and RoPE
    frequencies kept fp32) or fp8 (e4m3 block linear weights, the rest bf16)."""
    p = dit_parameters(s)
    total = 2 * p["total"] + 2 * p["fp32"]
    if dtype == "fp8":
        total -= p["block_weights"]  # 1 byte instead of 2 for every block linear weight
    elif dtype == "fp32":
        total = 4 * p["total"]
    per_block = {"bf16": 2, "fp8": 1, "fp32": 4}[dtype]
    return {"total": total, "block": per_block * p["block_max"], "rest": (4 if dtype == "fp32" else 2) * p["rest"]}


def t5_parameters(d_model=4096, d_ff=10240, layers=24, heads=64, d_kv=64, vocab=32128, buckets=32) -> dict[str, int]:
    """T5 v1.1 XXL encoder (public config, spec §4.1): gated-GELU FFN, tied input embedding, relative position bias."""
    block = 4 * d_model * heads * d_kv + 3 * d_model * d_ff + 2 * d_model
    rest = vocab * d_model + buckets * heads + d_model
    return {"total": layers * block + rest, "block": block, "rest": rest}


def _resblock_params(c: int) -> int:
    return 2 * (27 * c * c + c) + 2 * 2 * c  # two 3x3x3 convs with bias, two affine GroupNorms


def decoder_parameters(cfg: DecoderConfig) -> int:
    c, n = cfg.channels, cfg.num_res_blocks
    total = cfg.latent_dim * c[-1] + c[-1] + n[-1] * _resblock_params(c[-1])
    for i in range(len(c) - 1, 0, -1):
        out = c[i - 1] * cfg.temporal_expansions[i - 1] * cfg.spatial_expansions[i - 1] ** 2
        total += n[i] * _resblock_params(c[i]) + c[i] * out + out
    return total + n[0] * _resblock_params(c[0]) + c[0] * cfg.out_channels + cfg.out_channels


def latent_frames(frames: int) -> int:
    return (frames - 1) // 6 + 1  # spec §3.3


def visual_tokens(frames: int, s=None) -> int:
    s = s or DIT
    return latent_frames(frames) * (HEIGHT // 8 // s.patch_size) * (WIDTH // 8 // s.patch_size)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def dit_forward_flops(s, visual: int, text_valid: int, text_len: int = TEXT_LEN) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one B=1 forward of this package's AsymmDiT, by kind.

    Counts every matmul and convolution (what torch's FlopCounterMode counts): qkv, output projections, SwiGLU,
    attention QK^T and PV over the joint sequence (visual + valid text), and "other" (modulation, embedders, caption
    pool, RoPE angles, final layer). Text qkv runs on the valid tokens only; proj_y and the text MLP on all
    `text_len` positions (as native). Norms, RoPE rotation, softmax and gates are elementwise: not counted here.
    """
    dx, dy, td, hx, hy = s.dim_x, s.dim_y, s.text_dim, s.mlp_hidden_x, s.mlp_hidden_y
    n, lv, length, p2c = visual, text_valid, text_len, s.patch_size**2 * s.in_channels
    f = {"qkv": 0.0, "proj": 0.0, "mlp": 0.0, "attention": 0.0, "other": 0.0}
    for i in range(s.depth):
        update_y = i < s.depth - 1
        f["qkv"] += 2 * (n * dx + lv * dy) * 3 * dx
        f["attention"] += 4 * (n + lv) ** 2 * dx  # QK^T and PV, all heads (heads x head_dim = dim_x)
        f["proj"] += 2 * n * dx * dx + (2 * length * dx * dy if update_y else 0)
        f["mlp"] += 2 * n * 3 * dx * hx + (2 * length * 3 * dy * hy if update_y else 0)
        f["other"] += 2 * dx * (4 * dx + (4 if update_y else 1) * dy)  # mod_x, mod_y (once per sample)
    f["other"] += 2 * n * p2c * dx + 2 * (s.timestep_freq_dim * dx + dx * dx)  # patch embed, timestep MLP
    f["other"] += 2 * (length + 1) * td * 2 * td + 2 * td * td + 4 * (length + 1) * td + 2 * td * dx  # pool
    f["other"] += 2 * length * td * dy + 2 * n * 3 * s.num_heads * s.head_dim // 2  # t5_yproj, RoPE angles
    f["other"] += 2 * dx * 2 * dx + 2 * n * dx * p2c  # final layer
    return f


def linear_flops(f: dict[str, float]) -> float:
    return f["qkv"] + f["proj"] + f["mlp"] + f["other"]


def decoder_work(cfg: DecoderConfig, t: int, h: int, w: int) -> tuple[float, float]:
    """(conv FLOPs, bf16 bytes of all ResBlock inputs) to decode one latent tile of t x h x w (batch 1, all frames).

    Native frame arithmetic: each upsampling stage turns t frames into (t - 1) * st + 1 (spec §3.2).
    """
    c, n = cfg.channels, cfg.num_res_blocks
    res = lambda ch, vox: 2 * 2 * 27 * ch * ch * vox  # noqa: E731  (two 3x3x3 convs)
    vox = t * h * w
    flops = 2 * cfg.latent_dim * c[-1] * vox + n[-1] * res(c[-1], vox)
    act = n[-1] * 2 * c[-1] * vox
    for i in range(len(c) - 1, 0, -1):
        st, sp = cfg.temporal_expansions[i - 1], cfg.spatial_expansions[i - 1]
        flops += n[i] * res(c[i], vox) + 2 * c[i] * c[i - 1] * st * sp * sp * vox
        act += n[i] * 2 * c[i] * vox
        t, h, w = (t - 1) * st + 1, h * sp, w * sp
        vox = t * h * w
    flops += n[0] * res(c[0], vox) + 2 * c[0] * cfg.out_channels * vox
    return flops, act + n[0] * 2 * c[0] * vox


def tiles_of(t: int, grid: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(t, h, w) latent sizes of every tile of a (rows, cols) grid at 60 x 106 latents (package tile_spans)."""
    rows = tile_spans(HEIGHT // 8, grid[0], OVERLAP)
    cols = tile_spans(WIDTH // 8, grid[1], OVERLAP)
    return [(t, r1 - r0, c1 - c0) for r0, r1 in rows for c0, c1 in cols]


# ---------------------------------------------------------------------------------------------------------------
# Assumption sets: the optimistic and the pessimistic end of every range


@dataclass(frozen=True)
class Case:
    name: str
    eff_linear: float  # fraction of PEAK_BF16 reached by the DiT's large GEMMs
    eff_attention: float  # ... by the attention kernel (head dim 128, non-causal, long sequences)
    eff_conv: float  # ... by the VAE's 3x3x3 bf16 convolutions (cuDNN)
    elementwise: float  # HBM bytes per visual token per DiT block of norms, RoPE, gates, SwiGLU product, copies
    vae_passes: float  # HBM passes over each ResBlock activation for GroupNorm, SiLU, padding, residual add
    hbm: float  # effective HBM bytes/s for those memory-bound ops
    host_link: float  # host -> device bytes/s for model offload's copies (pageable memory, PCIe 5 x16)
    pinned_link: float  # host -> device bytes/s for sequential offload's streamed blocks (page-locked memory)
    act_model: str  # "fused": minimal live set; "eager": this package's eager PyTorch live set
    act_slack: float  # caching-allocator fragmentation on top of live tensors
    vae_factor: float | None  # ResBlock live set in units of its padded input (None: package CPU calibration, 8)
    overhead: float  # CUDA context, cuBLAS/cuDNN workspaces (not in torch.cuda.max_memory_allocated)
    dequant: float  # FP8: HBM bytes per block weight per forward to rebuild it in bf16
    dequant_live: float  # FP8: bytes per element live while the largest layer is rebuilt


# The fp8 ends: a fused dequantizing kernel (read 1 B, write and re-read 2 B) vs dit/fp8.py's FP8Linear, which goes
# through fp32 (fp8 -> fp32 copy, times the fp32 scale, round to bf16, then the matmul reads it): ~21 B, 8 B live.
LOW = Case(
    name="low", eff_linear=0.70, eff_attention=0.60, eff_conv=0.50, elementwise=0.15e6, vae_passes=6, hbm=3.0e12,
    host_link=25e9, pinned_link=50e9, act_model="fused", act_slack=1.0, vae_factor=4.0, overhead=0.5 * GB, dequant=5,
    dequant_live=2,
)  # fmt: skip
HIGH = Case(
    name="high", eff_linear=0.60, eff_attention=0.40, eff_conv=0.25, elementwise=1.0e6, vae_passes=12, hbm=2.5e12,
    host_link=10e9, pinned_link=25e9, act_model="eager", act_slack=1.1, vae_factor=None, overhead=1.0 * GB,
    dequant=21, dequant_live=8,
)  # fmt: skip


def dit_activation_values(s, model: str) -> int:
    """bf16-equivalent values per visual token live at a block's peak (fp32 temporaries count double).

    fused: residual x + SwiGLU's w1 output (2 x hidden) + the gated product (hidden).
    eager (this package, inference mode): the larger of the attention peak, 13 dx (x, its normed copy, qkv 3 dx,
    roped q and k 2 dx, joint q/k/v 3 dx, attention output, its contiguous copy, proj_x output; RoPE on k reaches
    the same: x, normed x, qkv, roped q, normed k and 6 dx of fp32 temporaries), and the SwiGLU peak, 2 dx + 4 hidden
    (x, its normed copy, w1 output 2 hidden, SiLU output, product).
    """
    dx, hx = s.dim_x, s.mlp_hidden_x
    return dx + 3 * hx if model == "fused" else max(13 * dx, 2 * dx + 4 * hx)


def dit_activation_bytes(s, visual: int, text_valid: int, batch: int, case: Case) -> float:
    """Peak activation bytes of a forward with `batch` samples (B=2: batched CFG), plus the cached RoPE tables."""
    per_token = 2 * dit_activation_values(s, case.act_model) * case.act_slack
    rope = 2 * 4 * visual * s.num_heads * s.head_dim // 2  # cos and sin (N, heads, head_dim / 2) fp32, shared
    return batch * (visual + text_valid) * per_token + rope


def vae_decode_bytes(
    cfg: DecoderConfig, t: int, grid: tuple[int, int], chunk: int | None, case: Case, dtype=torch.bfloat16
) -> float:
    """Decode peak (largest tile's activations + float32 output video), from the package's estimate_decode_bytes;
    `chunk` latent frames at a time (streaming), or all at once (None).

    The package calibrated its ResBlock factor (8 x the padded input) on CPU; case.vae_factor replaces it for the
    low end (GPU: the input kept for the residual, the normed/activated copy, the padded copy, the conv output).
    """
    th = max(e - s for s, e in tile_spans(HEIGHT // 8, grid[0], OVERLAP))
    tw = max(e - s for s, e in tile_spans(WIDTH // 8, grid[1], OVERLAP))
    factor = case.vae_factor or RESBLOCK_FACTOR
    with mock.patch.object(vae_decode, "RESBLOCK_FACTOR", factor):
        act = estimate_decode_bytes(cfg, 1, chunk or t, th, tw, dtype, chunk is not None, t)
    if grid == (1, 1) and chunk is None:
        return act  # full: the estimate's two fp32 tile outputs cover the bf16 output and its fp32 copy
    return act + output_bytes(cfg, (1, cfg.latent_dim, t, HEIGHT // 8, WIDTH // 8))  # fp32 video being assembled


# ---------------------------------------------------------------------------------------------------------------
# Time and memory per mode

MODES = {
    # name: (offload, DiT dtype, T5 dtype, batched CFG)
    "resident bf16": ("none", "bf16", "fp32", False),
    "resident bf16, T5 bf16": ("none", "bf16", "bf16", False),
    "resident fp8, T5 bf16": ("none", "fp8", "bf16", False),
    "model offload bf16": ("model", "bf16", "fp32", False),
    "model offload bf16, batched CFG": ("model", "bf16", "fp32", True),
    "model offload fp8, T5 bf16": ("model", "fp8", "bf16", False),
    "sequential offload bf16": ("sequential", "bf16", "fp32", False),
}
GRID = default_tiles((HEIGHT // 8, WIDTH // 8), OVERLAP)
VAE_PLANS = {"full": ((1, 1), None), "tiled": (GRID, None), "tiled+streamed": (GRID, 1)}  # (tiles, frames per chunk)


def weights_at_decode(mode: str, s: DiTConfig = DIT, cfg: DecoderConfig = DECODER) -> float:
    """Weight bytes on the device while the VAE decodes: everything when resident, else the decoder only."""
    offload, dtype, t5_dtype, _ = MODES[mode]
    vae = 2 * decoder_parameters(cfg)
    if offload != "none":
        return vae
    return vae + dit_bytes(s, dtype)["total"] + (4 if t5_dtype == "fp32" else 2) * t5_parameters()["total"]


def vae_plan(frames: int, name: str, mode: str = "resident bf16") -> tuple[tuple[int, int], int | None]:
    """(tiles, frames per chunk) of a named plan; "auto" is the package default: plan_decode with 80% of the free
    memory (the card minus the weights on it and the overhead) as its budget."""
    if name != "auto":
        return VAE_PLANS[name]
    budget = DEFAULT_BUDGET_FRACTION * (CAPACITY - weights_at_decode(mode) - HIGH.overhead)
    plan = plan_decode(DECODER, (1, DECODER.latent_dim, latent_frames(frames), HEIGHT // 8, WIDTH // 8),
                       torch.bfloat16, int(budget), OVERLAP)  # fmt: skip
    return plan.tiles, plan.frames_per_chunk


def dequant_seconds(s, case: Case) -> float:
    """Seconds per forward to rebuild every fp8 block weight in bf16 (memory-bound)."""
    return dit_parameters(s)["block_weights"] * case.dequant / case.hbm


def dit_forward_seconds(s, visual: int, text_valid: int, case: Case) -> float:
    f = dit_forward_flops(s, visual, text_valid)
    compute = linear_flops(f) / (PEAK_BF16 * case.eff_linear) + f["attention"] / (PEAK_BF16 * case.eff_attention)
    return compute + case.elementwise * visual * s.depth / case.hbm


def vae_seconds(cfg: DecoderConfig, frames: int, plan: str, case: Case) -> float:
    grid, _ = vae_plan(frames, plan)  # streaming does not change the work
    work = [decoder_work(cfg, *tile) for tile in tiles_of(latent_frames(frames), grid)]
    flops, act = sum(w[0] for w in work), sum(w[1] for w in work)
    return flops / (PEAK_BF16 * case.eff_conv) + case.vae_passes * 2 * act / case.hbm  # each pass reads and writes


def video_seconds(
    frames: int, mode: str, vae: str, case: Case, s: DiTConfig = DIT, cfg: DecoderConfig = DECODER
) -> dict:
    """Seconds per stage of one video (64 steps, CFG: a cond and an uncond forward per step)."""
    offload, dtype, t5_dtype, _ = MODES[mode]
    n = visual_tokens(frames, s)
    t5 = t5_parameters()
    t5_flops = 2 * t5["total"] * TEXT_LEN * 2  # 2 prompts, 256 tokens
    t5_time = t5_flops / (0.5 * PEAK_FP32 if t5_dtype == "fp32" else 0.5 * PEAK_BF16)
    forward = dit_forward_seconds(s, n, TEXT_VALID, case) + dit_forward_seconds(s, n, 0, case)
    dit_b = dit_bytes(s, dtype)
    if dtype == "fp8":  # every block weight is rebuilt in bf16 for each of the two forwards
        forward += 2 * dequant_seconds(s, case)
    t5_b = t5["total"] * (4 if t5_dtype == "fp32" else 2)
    vae_b = 2 * decoder_parameters(cfg)
    transfer = 0.0
    if offload == "model":  # each component copied in once for its stage; copies are dropped, never copied back
        transfer = (t5_b + dit_b["total"] + vae_b) / case.host_link
    elif offload == "sequential":  # the floor: no block resident, every block streamed in once per forward
        stream = (dit_b["total"] - dit_b["rest"]) / case.pinned_link
        # prefetched on a side stream while the previous block computes: only what the compute cannot hide costs
        per_forward = max(0.0, stream - forward / 2)
        transfer = (t5_b + dit_b["rest"] + vae_b) / case.host_link + 2 * STEPS * per_forward
    stages = {"text": t5_time, "dit": STEPS * forward, "vae": vae_seconds(cfg, frames, vae, case), "copies": transfer}
    stages["total"] = sum(stages.values())
    return stages


def peak_bytes(frames: int, mode: str, vae: str, case: Case, s: DiTConfig = DIT, cfg: DecoderConfig = DECODER) -> float:
    """Peak device bytes: weights on the device + the largest stage's activations + fixed overhead."""
    offload, dtype, t5_dtype, batched = MODES[mode]
    n, t = visual_tokens(frames, s), latent_frames(frames)
    t5 = t5_parameters()
    t5_size = 4 if t5_dtype == "fp32" else 2
    dit_b = dit_bytes(s, dtype)
    largest = max(a * b for a, b, _ in _block_matrices(s, True))
    dequant = case.dequant_live * largest if dtype == "fp8" else 0  # one layer being rebuilt
    act = dit_activation_bytes(s, n, TEXT_VALID, 2 if batched else 1, case) + dequant
    vae_w = 2 * decoder_parameters(cfg)
    vae_act = vae_decode_bytes(cfg, t, *vae_plan(frames, vae, mode), case)
    if offload == "none":
        peak = weights_at_decode(mode, s, cfg) + max(T5_ACTIVATIONS, act, vae_act)
    elif offload == "model":
        peak = max(t5_size * t5["total"] + T5_ACTIVATIONS, dit_b["total"] + act, vae_w + vae_act)
    else:
        t5_stream = t5_size * (t5["rest"] + t5["block"])
        # at most two streamed blocks on the device: the running one and the next, being prefetched
        peak = max(t5_stream + T5_ACTIVATIONS, dit_b["rest"] + 2 * dit_b["block"] + act, vae_w + vae_act)
    return peak + case.overhead


# ---------------------------------------------------------------------------------------------------------------
# Published figures (spec) and the fine-tuner's implied utilisation


FINE_TUNE = [(37, 50, 1.67), (61, 64, 3.35), (79, "69-78", 4.92), (85, 80, 5.44)]  # spec §7.5: 1 x H100 SXM


def train_step_flops(s, frames: int) -> float:
    """LoRA fine-tune step (spec §7.5, §1.9): forward, recompute of qkv and FFN (all 48 blocks checkpointed; the
    post-attention checkpoint is not passed; attention is never recomputed), input gradients of every linear
    (frozen base weights: no weight gradients besides LoRA's), attention backward at 2.5 x its forward."""
    f = dit_forward_flops(s, visual_tokens(frames, s), TEXT_VALID)
    return 2 * linear_flops(f) + f["qkv"] + f["mlp"] + 3.5 * f["attention"]


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _table(header: str, rows: list[str]) -> list[str]:
    """Markdown table from " | "-separated header and rows."""
    return [f"| {header} |", "|" + "---|" * len(header.split(" | "))] + [f"| {r} |" for r in rows] + [""]


def _rng(lo: float, hi: float, digits: int = 1) -> str:
    a, b = sorted((lo, hi))
    return f"{a:.{digits}f}" if round(a, digits) == round(b, digits) else f"{a:.{digits}f}–{b:.{digits}f}"


def _both(fn, digits: int = 1) -> str:
    """fn(case) at both ends of the assumptions, as a range."""
    return _rng(fn(LOW), fn(HIGH), digits)


def _gb(mode: str, frames: int, vae: str) -> str:
    lo, hi = (peak_bytes(frames, mode, vae, c) / GB for c in (LOW, HIGH))
    mark = " ✗" if lo > CAPACITY / GB else (" (✗)" if hi > CAPACITY / GB else "")
    if vae == "auto":
        (rows, cols), chunk = vae_plan(frames, vae, mode)
        mark += f" [{rows}×{cols}, {chunk or 'all'}]"
    return _rng(lo, hi) + mark


def _share(f: dict[str, float]) -> float:
    return f["attention"] / (linear_flops(f) + f["attention"])


def _assumptions() -> list[str]:
    t5 = t5_parameters()["total"]
    rows = [
        f"H100 SXM dense bf16 peak | {PEAK_BF16 / 1e12:g} TFLOP/s (fp32 without tensor cores: {PEAK_FP32 / 1e12:g}) | "
        "NVIDIA H100 SXM datasheet",
        f"HBM3 bandwidth | {HBM / 1e12:g} TB/s peak, {HIGH.hbm / 1e12:g}–{LOW.hbm / 1e12:g} TB/s reached | "
        "datasheet; the reach is assumed",
        f"memory | {CAPACITY / GB:g} GB; ✗ = over it even at the low end, (✗) = over it at the high end | datasheet",
        f"MFU of the DiT linears | {HIGH.eff_linear:.0%}–{LOW.eff_linear:.0%} | assumed (large bf16 GEMMs)",
        f"MFU of attention | {HIGH.eff_attention:.0%}–{LOW.eff_attention:.0%} | assumed: 40% ≈ a "
        "FlashAttention-2-class kernel (PyTorch SDPA's flash backend), 60% ≈ FA3/cuDNN-class",
        f"MFU of the VAE's 3×3×3 convs | {HIGH.eff_conv:.0%}–{LOW.eff_conv:.0%} | assumed (cuDNN, NCDHW, bf16)",
        f"DiT elementwise traffic | {LOW.elementwise / 1e6:g}–{HIGH.elementwise / 1e6:g} MB per visual token per "
        "block | counted by hand: fused (torch.compile) vs this package's eager fp32 norms, RoPE, gates, copies",
        f"VAE elementwise traffic | {LOW.vae_passes:g}–{HIGH.vae_passes:g} read+write passes over each ResBlock "
        "input | assumed (2 GroupNorms, 2 SiLUs, 2 pads, residual add)",
        f"host link, model offload | {HIGH.host_link / 1e9:g}–{LOW.host_link / 1e9:g} GB/s | assumed: "
        "pageable copies over PCIe 5 ×16 (64 GB/s nominal), not overlapped with compute",
        f"host link, streamed blocks | {HIGH.pinned_link / 1e9:g}–{LOW.pinned_link / 1e9:g} GB/s | assumed: "
        "page-locked copies over PCIe 5 ×16 on a side stream, overlapped with the previous block's compute",
        f"valid text tokens | {TEXT_VALID} for the prompt (typically 20–60), 0 for the empty negative prompt | "
        "assumed; spec §4.2 (an empty prompt is fully masked)",
        "text positions in the y stream | 256: proj_y and the text MLP run on all of them | spec §1.4, §4.1",
        f"DiT activations | {dit_activation_values(DIT, 'fused'):,}–{dit_activation_values(DIT, 'eager'):,} bf16 "
        f"values per token (×{HIGH.act_slack} allocator slack at the high end) + RoPE cos/sin tables (fp32) | "
        "counted from dit/model.py's live tensors; flash/SDPA attention is linear in tokens",
        "VAE decode activations | package `estimate_decode_bytes` (ResBlock 8× its padded input, CPU-calibrated) "
        "at the high end, the same with 4× at the low end; bf16 | vae/decode.py; the GPU factor is assumed",
        f"VAE tiling | `enable_vae_tiling()` defaults: {GRID[0]}×{GRID[1]} tiles, overlap {OVERLAP} latent px; "
        "'tiled+streamed' adds 1 latent frame per chunk | vae/decode.py",
        f"fixed overhead | {LOW.overhead / GB:g}–{HIGH.overhead / GB:g} GB (CUDA context, workspaces) | assumed",
        f"T5-XXL encoder | {t5:,} params; fp32 by default (package and reference), bf16 optional | derived from "
        "the public T5 v1.1 XXL config, spec §4.1",
        f"FP8 DiT | every block linear weight in e4m3 (1 B) + a fp32 scale, rebuilt in bf16 per call, the rest "
        f"bf16; dequantization traffic {LOW.dequant:g}–{HIGH.dequant:g} B per weight per forward (fused kernel vs "
        "FP8Linear's fp32 path) | dit/fp8.py (new in the working tree); spec §9 (third-party fp8 files)",
    ]
    return ["## Assumptions", "", *_table("quantity | value | source", rows)]


def _weights() -> list[str]:
    p, t5, dec = dit_parameters(DIT), t5_parameters()["total"], decoder_parameters(DECODER)
    size = {d: dit_bytes(DIT, d)["total"] / GB for d in ("fp32", "bf16", "fp8")}
    rows = [
        f"DiT | {p['total']:,} | {size['fp32']:.1f} | {size['bf16']:.2f} | {size['fp8']:.2f} | spec §0: "
        "10,027,677,744; files: bf16 20.1 GB, fp8_e4m3fn ≈ 10.3 GB (§9)",
        f"DiT largest block | {p['block_max']:,} | {4 * p['block_max'] / GB:.2f} | {2 * p['block_max'] / GB:.2f} | "
        f"{p['block_max'] / GB:.2f} | sequential offload holds one",
        f"T5-XXL encoder | {t5:,} | {4 * t5 / GB:.2f} | {2 * t5 / GB:.2f} | – | not in the spec (derived)",
        f"VAE decoder | {dec:,} | {4 * dec / GB:.2f} | {2 * dec / GB:.2f} | – | spec §3.2: 362,526,595",
    ]
    return ["## Weights", "", *_table("component | params | fp32 GB | bf16 GB | fp8 GB | check", rows)]


def _flops() -> list[str]:
    rows = []
    for frames in FRAMES:
        n, t = visual_tokens(frames), latent_frames(frames)
        cond, uncond = dit_forward_flops(DIT, n, TEXT_VALID), dit_forward_flops(DIT, n, 0)
        total = linear_flops(cond) + cond["attention"]
        video = STEPS * (total + linear_flops(uncond) + uncond["attention"])
        vae = [sum(decoder_work(DECODER, *tile)[0] for tile in tiles_of(t, g)) / 1e15 for g in ((1, 1), GRID)]
        rows.append(
            f"{frames} | {t} | {n:,} | {n + TEXT_VALID:,} | {total / 1e15:.3f} | {_share(cond):.1%} | "
            f"{_share(dit_forward_flops(DIT, n, TEXT_LEN)):.1%} | {video / 1e15:.0f} | {vae[0]:.2f} | {vae[1]:.2f}"
        )
    header = (
        "frames | latent T | visual tokens N | joint sequence S (cond) | PFLOP / cond forward | attention share | "
        "attention share, 256 text tokens | PFLOP / video (DiT) | VAE PFLOP, full | "
        f"VAE PFLOP, tiled {GRID[0]}×{GRID[1]}"
    )
    note = (
        "Per block: qkv 2·N·3072·9216, proj 2·N·3072², SwiGLU 2·N·3·3072·8192, attention 4·S²·3072 (QK^T and PV, "
        "S = N + valid text tokens), plus the text stream (qkv on the valid tokens; proj_y and the MLP on all 256 "
        "positions, none in block 47), modulation, embedders and the final layer. The uncond forward (0 text "
        "tokens) costs within 0.5% of the cond one; batched CFG does the same FLOPs in one B=2 call. VAE: the "
        "decoder's convolutions (3×3×3 in the ResBlocks, 1×1×1 projections), tiles overlapping by 8 latent px."
    )
    return ["## Tokens and FLOPs", "", *_table(header, rows), note, ""]


def forward_parts(n: int, case: Case) -> dict[str, float]:
    """Seconds of one cond forward, by part."""
    f = dit_forward_flops(DIT, n, TEXT_VALID)
    return {
        "linear": linear_flops(f) / (PEAK_BF16 * case.eff_linear),
        "attention": f["attention"] / (PEAK_BF16 * case.eff_attention),
        "elementwise": case.elementwise * n * DIT.depth / case.hbm,
        "total": dit_forward_seconds(DIT, n, TEXT_VALID, case),
    }


def _time() -> list[str]:
    def row(frames: int) -> str:
        n = visual_tokens(frames)
        parts = [_both(lambda c, k=k: forward_parts(n, c)[k], 2) for k in forward_parts(n, LOW)]
        dit = _both(lambda c: video_seconds(frames, "resident bf16", "tiled", c)["dit"] / 60)
        vae = [_both(lambda c, p=p: vae_seconds(DECODER, frames, p, c)) for p in ("full", "tiled")]
        return " | ".join([str(frames), *parts, dit, *vae])

    modes = ["resident bf16", "resident fp8, T5 bf16", "model offload bf16", "sequential offload bf16"]

    def total(frames: int) -> str:
        cells = [_both(lambda c, m=m: video_seconds(frames, m, "tiled", c)["total"] / 60) for m in modes]
        copies = _both(lambda c: video_seconds(frames, "sequential offload bf16", "tiled", c)["copies"] / 60)
        return " | ".join([str(frames), *cells, copies])

    header = (
        "frames | linear s / fwd | attention s / fwd | elementwise s / fwd | s / forward | DiT sampling min "
        "(128 forwards) | VAE decode s, full | VAE decode s, tiled"
    )
    note = (
        "T5 is negligible (2 · 4.76 B params · 256 tokens · 2 prompts ≈ 4.9 TFLOP: under 0.2 s even in fp32). "
        "FP8 weights cost the same matmul FLOPs; rebuilding the 10 GB of block weights in bf16 adds "
        f"{_both(lambda c: dequant_seconds(DIT, c), 2)} s per forward (about "
        f"{_both(lambda c: 2 * STEPS * dequant_seconds(DIT, c), 0)} s per video). Model "
        "offload copies each component to the device once per video (about 40 GB, one way: the host copy is the master "
        "and device copies are dropped, never copied back). Sequential offload at its floor (no block kept on the "
        "device) streams every DiT block in once per forward (20 GB × 128 forwards ≈ 2.6 TB) from page-locked "
        "memory on a side stream, prefetching block i+1 while block i computes: only the part the compute cannot "
        "hide costs time (most at 31 frames, nothing at 163). With room on the card it keeps blocks resident and "
        "streams fewer."
    )
    return [
        "## Time",
        "",
        *_table(header, [row(f) for f in FRAMES]),
        "Minutes per video (T5 + 64 steps + tiled VAE decode + offload copies):",
        "",
        *_table("frames | " + " | ".join(modes) + " | of which sequential-offload copies", [total(f) for f in FRAMES]),
        note,
        "",
    ]


def _memory() -> list[str]:
    def row(frames: int) -> str:
        n, t = visual_tokens(frames), latent_frames(frames)
        dit = [_both(lambda c, b=b: dit_activation_bytes(DIT, n, TEXT_VALID, b, c) / GB) for b in (1, 2)]
        vae = [_both(lambda c, p=p: vae_decode_bytes(DECODER, t, *vae_plan(frames, p), c) / GB) for p in VAE_PLANS]
        return " | ".join([str(frames), *dit, *vae])

    header = "frames | DiT activations B=1 | B=2 (batched CFG) | VAE decode, full | tiled | tiled+streamed"
    out = ["## Memory", "", "Components (GB):", "", *_table(header, [row(f) for f in FRAMES])]
    out += [
        "The VAE columns include the float32 output video (0.8 GB at 163 frames). Full decode at 163 frames is the "
        "largest single item: its 128-channel level is 17 GB per bf16 copy at 163×480×848.",
        "",
    ]
    titles = {
        "full": "full VAE decode",
        "tiled": f"tiled VAE decode (`enable_vae_tiling()`: {GRID[0]}×{GRID[1]} tiles)",
        "auto": 'the package\'s default VAE mode "auto" (plan in brackets: tiles, latent frames per chunk)',
    }
    for vae, title in titles.items():
        rows = [f"{frames} | " + " | ".join(_gb(mode, frames, vae) for mode in MODES) for frames in FRAMES]
        out += [f"Peak device memory (GB), {title}:", "", *_table("frames | " + " | ".join(MODES), rows)]
    out += [
        "Modes: resident = every model on the GPU (the package default; T5 in fp32 unless stated); model offload = "
        "`enable_model_cpu_offload()`, one model on the GPU at a time, peak = the largest stage; sequential offload "
        '= `enable_sequential_cpu_offload()`, one DiT (or T5) block at a time plus the rest. "auto" picks the '
        "least tiling, then the longest time chunk (exact streaming), whose package estimate fits 80% of the free "
        "memory: it fits by construction if that estimate is right, and it spends the memory it is given, so its "
        "peak follows the budget rather than the frame count.",
        "",
    ]
    return out


def _published() -> list[str]:
    t5, dec = t5_parameters()["total"], decoder_parameters(DECODER)
    n, t = visual_tokens(163), latent_frames(163)
    ref_weights = (dit_bytes(DIT, "fp32")["total"] + 4 * t5 + 4 * dec) / GB
    ref_dit = _both(lambda c: (dit_bytes(DIT, "fp32")["total"] + dit_activation_bytes(DIT, n, TEXT_VALID, 1, c)) / GB)
    ref_vae = _both(lambda c: (4 * dec + vae_decode_bytes(DECODER, t, (2, 4), None, c, torch.float32)) / GB)
    rows = [
        f'"about 60 GB VRAM" on a single GPU, at least one H100 | spec §9 (README) | the reference keeps fp32 '
        f"weights (spec §1.8, §3.5, §4.1): DiT + T5 + decoder = {ref_weights:.1f} GB; with its cpu_offload at 163 "
        f"frames the DiT stage is {ref_dit} GB and its fp32 tiled_spatial 2×4 decode stage {ref_vae} GB (plus "
        "≤ 1 GB overhead)",
        "the initial release needed 4 H100s | spec §9 | not modelled (fp32, no offload, multi-GPU code path)",
        f'ComfyUI "under 20 GB" | spec §9 | model offload, fp8 DiT, T5 bf16, tiled decode: '
        f"{_gb('model offload fp8, T5 bf16', 163, 'tiled')} GB at 163 frames; sequential offload bf16, tiled: "
        f"{_gb('sequential offload bf16', 163, 'tiled')} GB",
        f"DiT files: bf16 20.1 GB, fp8_e4m3fn ≈ 10.3 GB, fp8_scaled 10 GB | spec §9 | "
        f"{dit_bytes(DIT, 'bf16')['total'] / GB:.2f} GB bf16; {dit_bytes(DIT, 'fp8')['total'] / GB:.2f} GB with "
        "only the block weights in fp8",
        "LoRA fine-tuning on 1×H100 SXM | spec §7.5 | next table",
        "diffusers memory or time | spec §12 (CPU numerics only) | not published in our spec",
        "inference time on one H100 | – | not published in our spec",
    ]
    train = [
        f"{frames} | {visual_tokens(frames):,} | {vram} | {sec} | {train_step_flops(DIT, frames) / 1e15:.2f} | "
        f"{train_step_flops(DIT, frames) / sec / 1e12:.0f} | {train_step_flops(DIT, frames) / sec / PEAK_BF16:.0%}"
        for frames, vram, sec in FINE_TUNE
    ]
    header = "frames | visual tokens | VRAM GB (published) | s/it (published) | PFLOP / step (ours) | TFLOP/s | MFU"
    return [
        "## Published figures (spec) next to this estimate",
        "",
        *_table("published | source | this estimate", rows),
        "LoRA fine-tuning (spec §7.5, README numbers) and the utilisation they imply under this FLOP count:",
        "",
        *_table(header, train),
    ]


def _caveats() -> list[str]:
    shares = {fr: [_share(dit_forward_flops(DIT, visual_tokens(fr), lv)) for lv in (TEXT_VALID, TEXT_LEN)]
              for fr in FRAMES}  # fmt: skip
    eager = {fr: forward_parts(visual_tokens(fr), HIGH)["elementwise"] / forward_parts(visual_tokens(fr), HIGH)["total"]
             for fr in FRAMES}  # fmt: skip
    n = visual_tokens(163)
    f = dit_forward_flops(DIT, n, TEXT_VALID)
    mfu = _both(lambda c: 100 * (linear_flops(f) + f["attention"]) / forward_parts(n, c)["total"] / PEAK_BF16, 0)
    train = [train_step_flops(DIT, fr) / sec / PEAK_BF16 for fr, _, sec in FINE_TUNE]
    return [
        "## Method and caveats",
        "",
        "FLOPs are counted from the shapes (spec §1) and agree exactly with torch's FlopCounterMode on a small "
        "AsymmDiT (tests/test_estimate_h100.py). The 71% attention share quoted for 163 frames is not in the spec: "
        "it is bench/RESULTS.md's projection, which used S = 44,776 (all 256 text tokens). This count gives "
        f"{shares[163][1]:.1%} with 256 text tokens and {shares[163][0]:.1%} with {TEXT_VALID}: it agrees. The "
        f"text-token assumption moves the share by {100 * (shares[163][1] - shares[163][0]):.1f} point at 163 "
        f"frames and {100 * (shares[31][1] - shares[31][0]):.1f} at 31. Attention dominates from 85 frames on, so "
        "the attention kernel's efficiency is the largest uncertainty in the time; eager elementwise work (fp32 "
        f"RMS norms, fp32 RoPE, gates, copies) is the second: up to {eager[31]:.0%} of a forward at 31 frames and "
        f"{eager[163]:.0%} at 163 under the pessimistic assumptions, most of which torch.compile would remove.",
        "",
        "Times are compute plus memory-bound passes plus offload copies (only streamed blocks overlap compute), "
        "with no Python or launch "
        f"overhead (small next to forwards of seconds). A 163-frame forward runs at {mfu}% of peak in this model. "
        "The fine-tuning rows are the only published H100 timings in the spec; they imply "
        f"{_rng(100 * min(train), 100 * max(train), 0)}% (compiled, bf16, with a backward pass whose kernels are "
        "less efficient, and LoRA matmuls ignored here): consistent with the pessimistic end, and a reminder that "
        "the optimistic end needs FA3-class attention.",
        "",
        "Memory counts live tensors; nothing was measured on a GPU. DiT activations follow this package's eager "
        "inference code (13 dim_x-wide bf16 values per token at the attention peak) and assume a flash-style "
        "attention kernel (PyTorch SDPA on CUDA, or flash-attn): a materialized attention matrix would be far "
        "larger. Batched CFG with SDPA passes a key mask, which may select a different kernel; the flash backend "
        "avoids it. Full decode at 85 and 163 frames feeds convolutions tensors of more than 2^31 elements (the "
        "reference splits such convolutions in time, spec §3.1); whether cuDNN accepts them here is not checked. "
        "The VAE estimate is the package's CPU-calibrated one (fp32 RSS with oneDNN), here in bf16; on a GPU the "
        "caching allocator and cuDNN differ, hence the 4×–8× range: it is the least certain memory term, and it "
        "decides whether full decode fits. Peaks add the CUDA context, which torch.cuda.max_memory_allocated does "
        "not report. Weights are exact. 80 GB is the card's nominal size; slightly less is allocatable.",
        "",
    ]


def report() -> str:
    intro = (
        "Generated by `python bench/estimate_h100.py`; no GPU was used: every number is computed from shapes and "
        "the assumptions below. 848×480, 64 steps, classifier-free guidance with the empty negative prompt (a cond "
        "and an uncond forward per step), this package's pipeline. Ranges are low–high: the low end takes the "
        "optimistic value of every assumption, the high end the pessimistic one. GB = 10^9 bytes."
    )
    title = "# Mochi 1 preview on one H100 SXM: estimated time and peak memory"
    sections = (_assumptions, _weights, _flops, _time, _memory, _published, _caveats)
    return "\n".join([title, "", intro, ""] + [line for section in sections for line in section()])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("H100_ESTIMATE.md"))
    parser.add_argument("--no-write", action="store_true", help="only print the report")
    args = parser.parse_args()
    text = report()
    print(text)
    if not args.no_write:
        write_atomic(args.output, text)


if __name__ == "__main__":
    main()
