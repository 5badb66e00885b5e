"""FP8 weight storage for the DiT: block weight memory, output error and forward time next to bf16, one process.

Published width (3072/1536, 24 heads of 128), 2 blocks, random weights: normal with std 0.02 as `init_weights`,
then each output row of the blocks' Linears scaled by a log-normal factor (sigma 0.5), so rows differ in magnitude
as trained weights do (that is what per-channel scales are for). 6 x 32 x 32 latents (1,536 visual tokens) and 64
text tokens. Errors are against the fp32 model, at the blocks' visual output and at the velocity; bf16 and FP8 run
in bf16. Forward times are medians over interleaved repeats (CPU: bf16 and FP8 both multiply in fp32).

    python bench/bench_fp8.py [--repeats 3] [--threads 2] [--heads 24]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mochi_preview.configs import dit_config
from mochi_preview.dit import AsymmDiT, init_weights, parameter_bytes, quantize_dit_fp8
from mochi_preview.dit.fp8 import block_linears


def build(heads: int) -> AsymmDiT:
    """A random 2-block DiT in fp32 (heads=24: the published width)."""
    cfg = dit_config(depth=2, num_heads=heads, dim_y=64 * heads, text_dim=4096)
    g = torch.Generator().manual_seed(0)
    model = init_weights(AsymmDiT(cfg), std=0.02, generator=g).eval().requires_grad_(False)
    for name in block_linears(model):
        w = model.get_submodule(name).weight
        w.mul_(torch.exp(0.5 * torch.randn(w.shape[0], 1, generator=g)))
    return model


def cast(model: AsymmDiT, dtype: torch.dtype) -> AsymmDiT:
    """A copy in `dtype` with RoPE frequencies and QK-norm weights in fp32, as load_dit gives."""
    out = copy.deepcopy(model).to(dtype)
    for name, p in out.named_parameters():
        if name in model.fp32_parameter_names():
            p.data = p.data.float()
    return out


def forward(model: AsymmDiT, inputs) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(blocks' visual output (B, N, Dx) fp32, velocity fp32, seconds)."""
    seen = {}
    hook = model.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(x=out[0].float()))
    start = time.perf_counter()
    with torch.no_grad():
        v = model(*inputs)
    seconds = time.perf_counter() - start
    hook.remove()
    return seen["x"], v, seconds


def errors(out: torch.Tensor, ref: torch.Tensor) -> str:
    return f"{float((out - ref).norm() / ref.norm()):.2e} / {float((out - ref).abs().max() / ref.abs().max()):.2e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=24, help="24: published width; fewer for a quick check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ref32 = build(args.heads)
    models = {"bf16": cast(ref32, torch.bfloat16)}
    for granularity in ("tensor", "channel"):
        models[f"fp8 per {granularity}"] = quantize_dit_fp8(cast(ref32, torch.bfloat16), granularity)
    g = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(1, 12, 6, 32, 32, generator=g),  # 6 x 16 x 16 = 1,536 visual tokens
        torch.tensor([0.6]),
        torch.randn(1, 64, 4096, generator=g),
        torch.ones(1, 64, dtype=torch.bool),
    )
    x_ref, v_ref, t32 = forward(ref32, inputs)
    first = {name: forward(m, inputs) for name, m in models.items()}  # also the warm-up
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            times[name].append(forward(m, inputs)[2])
    median = {name: statistics.median(t) for name, t in times.items()}

    cfg = ref32.cfg
    b16 = parameter_bytes(models["bf16"].blocks)
    lines = [
        f"FP8 DiT weights, `bench/bench_fp8.py`: {cfg.depth} blocks of {cfg.dim_x}/{cfg.dim_y} ({cfg.num_heads} "
        f"heads), 1,536 visual + 64 text tokens, {args.threads} CPU threads, {args.repeats} interleaved repeats.",
        "",
        "| weights | block bytes | vs bf16 | rel. error blocks' x (L2 / max) | rel. error velocity (L2 / max) "
        "| forward vs bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        b = parameter_bytes(m.blocks)
        x, v, _ = first[name]
        lines.append(
            f"| {name} | {b / 2**20:,.1f} MiB | {b / b16:.3f} | {errors(x, x_ref)} | {errors(v, v_ref)} "
            f"| {median[name] / median['bf16']:.2f} ({median[name]:.1f} s) |"
        )
    lines += [
        "",
        f"Reference: the same model in fp32 ({parameter_bytes(ref32.blocks) / 2**20:,.1f} MiB of blocks, forward "
        f"{t32:.1f} s). Errors: ||out - ref|| / ||ref|| and max|out - ref| / max|ref|.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
