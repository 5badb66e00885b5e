"""DiT forward: ours next to diffusers' MochiTransformer3DModel, same random weights and inputs, one process run.

Reduced depth, published width (2 blocks of 3072/1536, 24 heads of 128). Reports time ratios (ours / diffusers) per
dtype, and the achieved FLOP rate over the matmul rate measured in the same run (F.linear at a DiT shape, per dtype).
`--long` adds one block at 16,000 visual tokens, where attention is half the FLOPs (at 163 frames it is 71%).

On a CPU without bf16 instructions our bf16 model multiplies bf16-stored tensors in fp32 (exact upcast, one rounding
of each output: what a GPU's tensor cores do), so its rate is compared with both the bf16 and the fp32 matmul rate;
on a CPU with them (avx512_bf16, amx_bf16, aarch64 bf16) it multiplies in bf16 (dit/layers.cpu_half_path). Each bf16
row names the path it took; `--cpu_half auto native upcast` times each path (MOCHI_CPU_HALF) side by side.

    python bench/bench_dit.py [--long] [--long_bf16] [--compile] [--dtypes float32 bfloat16] [--repeats 5] [--threads 2]
        [--cpu_half auto|native|upcast ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mochi_preview.dit.layers import HALF, NATIVE_HALF_FLAGS, cpu_flags, cpu_half_path, decide_cpu_half_path


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


def use_cpu_half(mode: str) -> None:
    """Take CPU half path `mode` ("auto", "native", "upcast") from the next forward on."""
    os.environ["MOCHI_CPU_HALF"] = mode
    decide_cpu_half_path.cache_clear()


def cpu_half_line() -> str:
    """Which half-precision instructions this CPU has, and the path "auto" takes for each format."""
    parts = []
    for dtype, flags in NATIVE_HALF_FLAGS.items():
        use_cpu_half("auto")
        found = sorted(flags & cpu_flags()) or ["none of " + "/".join(sorted(flags))]
        parts.append(f"{str(dtype).removeprefix('torch.')}: {', '.join(found)} -> auto = {cpu_half_path(dtype)}")
    return "CPU half paths: " + "; ".join(parts)


def compare(depth, frames, rows, cols, text_valid, repeats, dtypes, compile_too=False, modes=("auto",)):
    """Yields the table's lines as they are measured."""
    from mochi_preview import load_dit

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
        yield f"{depth} block(s), {n} visual + {text_valid} valid text tokens, {flops / 1e9:.0f} GFLOP"
        yield (
            "| dtype [CPU half path] | ours s | diffusers s | **ours / diffusers** | ours GFLOP/s "
            "| of matmul rate (same dtype) | of fp32 matmul rate | diffusers of matmul rate (same dtype) |"
        )
        yield "|---|---|---|---|---|---|---|---|"
        for dtype in dtypes:
            ours = load_dit(tmp, dtype=dtype)
            theirs = theirs32.to(dtype)
            # (label, model, MOCHI_CPU_HALF): one row per path for half dtypes; compiled blocks bake "auto" in
            variants = [("", ours, mode) for mode in (modes if dtype in HALF else ("auto",))]
            if compile_too:
                variants.append((" compiled", load_dit(tmp, dtype=dtype).compile_blocks(), "auto"))
            args_ours = (latents, sigma, feats, mask)
            args_theirs = (latents.to(dtype), feats.to(dtype), 1000 * (1 - sigma), mask.long())
            times = {(label, mode): [] for label, _, mode in variants}
            paths = {}
            with torch.inference_mode():
                for label, model, mode in variants:
                    use_cpu_half(mode)
                    model(*args_ours)  # warm-up (and compilation)
                    paths[label, mode] = cpu_half_path(dtype) if dtype in HALF else "-"
                theirs(*args_theirs, return_dict=False)
                t_theirs = []
                for _ in range(repeats):  # interleaved, so machine noise hits both sides alike
                    for label, model, mode in variants:
                        use_cpu_half(mode)
                        times[label, mode].append(_timed(model, *args_ours))
                    t_theirs.append(_timed(theirs, *args_theirs, return_dict=False))
            use_cpu_half("auto")
            b = statistics.median(t_theirs)
            rate, rate32 = rates[dtype], rates[torch.float32]
            name = str(dtype).removeprefix("torch.")
            for (label, mode), ts in times.items():
                a = statistics.median(ts)
                path = paths[label, mode] + (" (auto)" if mode == "auto" and dtype in HALF else "")
                yield (
                    f"| {name}{label} [{path}] | {a:.3f} | {b:.3f} | **{a / b:.2f}** | {flops / a / 1e9:.1f} "
                    f"| {flops / a / rate:.0%} | {flops / a / rate32:.0%} | {flops / b / rate:.0%} |"
                )
            del ours, variants
        yield (
            "matmul rate (F.linear 1536x3072 -> 3072): "
            + ", ".join(f"{str(k).removeprefix('torch.')} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", action="store_true", help="also one block at 16,000 visual tokens (fp32)")
    parser.add_argument("--long_bf16", action="store_true", help="the long case in bf16 too (diffusers: ~10 min)")
    parser.add_argument("--compile", action="store_true", help="also our model with compile_blocks()")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument(
        "--cpu_half", nargs="+", choices=["auto", "native", "upcast"], default=["auto"], help="bf16 paths to time"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(cpu_half_line())
    both = tuple(getattr(torch, name) for name in args.dtypes)
    for line in compare(2, 5, 26, 46, 64, args.repeats, both, args.compile, args.cpu_half):  # 1,495 visual tokens
        print(line, flush=True)
    if args.long:
        dtypes = both if args.long_bf16 else (torch.float32,)
        for line in compare(1, 16, 40, 100, 64, 2, dtypes, modes=args.cpu_half):  # 16,000 visual tokens
            print(line, flush=True)


if __name__ == "__main__":
    main()
