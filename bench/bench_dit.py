"""DiT forward: ours next to diffusers' MochiTransformer3DModel, same random weights and inputs, one process run.

Reduced depth, published width (2 blocks of 3072/1536, 24 heads of 128). Reports time ratios (ours / diffusers) per
dtype, and the achieved FLOP rate over the matmul rate measured in the same run (F.linear at a DiT shape, per dtype).
`--long` adds one block at 16,000 visual tokens, where attention is half the FLOPs (at 163 frames it is 71%).

On a CPU without bf16 instructions our bf16 model multiplies bf16-stored tensors in fp32 (exact upcast, one rounding
of each output: what a GPU's tensor cores do), so its rate is compared with both the bf16 and the fp32 matmul rate.

    python bench/bench_dit.py [--long] [--long_bf16] [--compile] [--dtypes float32 bfloat16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def dit_flops(n: int, l_text: int, depth: int, dx: int = 3072, dy: int = 1536, hx: int = 8192, hy: int = 4096) -> float:
    """Multiply-add FLOPs (x2) of a forward over n visual and l_text valid text tokens (embedders excluded)."""
    per_block = (
        2 * n * dx * 3 * dx  # qkv_x
        + 2 * l_text * dy * 3 * dx  # qkv_y
        + 2 * 2 * (n + l_text) ** 2 * dx  # QK^T and PV over all heads
        + 2 * n * dx * dx  # proj_x
        + 2 * l_text * dx * dy  # proj_y
        + 2 * n * (dx * 2 * hx + hx * dx)  # SwiGLU x
        + 2 * l_text * (dy * 2 * hy + hy * dy)  # SwiGLU y
    )
    return depth * per_block + 2 * n * dx * 48  # + final projection


def matmul_rate(dtype: torch.dtype, m: int = 1536, k: int = 3072, n: int = 3072, repeats: int = 3) -> float:
    """Best-of F.linear FLOP rate at the shape of a DiT projection (tokens x 3072 -> 3072)."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(a, w)
    best = min(_timed(torch.nn.functional.linear, a, w) for _ in range(repeats))
    return 2 * m * k * n / best


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def build(depth: int, folder: Path):
    """A random full-width diffusers model, saved; ours loads the saved folder through the real loading path."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    theirs = MochiTransformer3DModel(num_layers=depth).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    theirs.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")
    return theirs


def compare(depth, frames, rows, cols, text_valid, repeats, dtypes, compile_too=False) -> list[str]:
    from mochi_preview import load_dit

    lines = []
    rates = {dt: matmul_rate(dt) for dt in (torch.float32, torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        theirs32 = build(depth, Path(tmp))
        n = frames * (rows // 2) * (cols // 2)
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(1, 12, frames, rows, cols, generator=g)
        feats = torch.randn(1, 256, 4096, generator=g)
        mask = torch.zeros(1, 256, dtype=torch.bool)
        mask[0, :text_valid] = True
        sigma = torch.tensor([0.6])
        flops = dit_flops(n, text_valid, depth)
        lines.append(f"{depth} block(s), {n} visual + {text_valid} valid text tokens, {flops / 1e9:.0f} GFLOP")
        lines.append(
            "| dtype | ours s | diffusers s | **ours / diffusers** | ours GFLOP/s | of matmul rate (same dtype) "
            "| of fp32 matmul rate | diffusers of matmul rate (same dtype) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for dtype in dtypes:
            ours = load_dit(tmp, dtype=dtype)
            theirs = theirs32.to(dtype)
            variants = [("", ours)]
            if compile_too:
                variants.append((" compiled", load_dit(tmp, dtype=dtype).compile_blocks()))
            args_ours = (latents, sigma, feats, mask)
            args_theirs = (latents.to(dtype), feats.to(dtype), 1000 * (1 - sigma), mask.long())
            with torch.inference_mode():
                for _, model in variants:
                    model(*args_ours)  # warm-up (and compilation)
                theirs(*args_theirs, return_dict=False)
                times = {name: [] for name, _ in variants}
                t_theirs = []
                for _ in range(repeats):  # interleaved, so machine noise hits both sides alike
                    for name, model in variants:
                        times[name].append(_timed(model, *args_ours))
                    t_theirs.append(_timed(theirs, *args_theirs, return_dict=False))
            b = statistics.median(t_theirs)
            rate, rate32 = rates[dtype], rates[torch.float32]
            name = str(dtype).removeprefix("torch.")
            for variant, ts in times.items():
                a = statistics.median(ts)
                lines.append(
                    f"| {name}{variant} | {a:.3f} | {b:.3f} | **{a / b:.2f}** | {flops / a / 1e9:.1f} "
                    f"| {flops / a / rate:.0%} | {flops / a / rate32:.0%} | {flops / b / rate:.0%} |"
                )
            del ours, variants
        lines.append(
            "matmul rate (F.linear 1536x3072 -> 3072): "
            + ", ".join(f"{str(k).removeprefix('torch.')} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", action="store_true", help="also one block at 16,000 visual tokens (fp32)")
    parser.add_argument("--long_bf16", action="store_true", help="the long case in bf16 too (diffusers: ~10 min)")
    parser.add_argument("--compile", action="store_true", help="also our model with compile_blocks()")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    both = tuple(getattr(torch, name) for name in args.dtypes)
    for line in compare(2, 5, 26, 46, 64, args.repeats, both, args.compile):  # 1,495 visual tokens
        print(line, flush=True)
    if args.long:
        dtypes = both if args.long_bf16 else (torch.float32,)
        for line in compare(1, 16, 40, 100, 64, 2, dtypes):  # 16,000 visual tokens
            print(line, flush=True)


if __name__ == "__main__":
    main()
