"""DiT forward: ours next to diffusers' MochiTransformer3DModel, same random weights and inputs, one process run.

Reduced depth, published width (2 blocks of 3072/1536, 24 heads of 128). Reports time ratios (ours / diffusers) per
dtype, and the achieved FLOP rate over the matmul rate measured in the same run. Optionally one block at a long
sequence (>= 16,000 visual tokens), where attention dominates as at the published size.

    python bench/bench_dit.py [--tokens 1495] [--long] [--repeats 5] [--threads 2]
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


def matmul_rate(dtype: torch.dtype, m: int = 2048, k: int = 3072, n: int = 3072, repeats: int = 5) -> float:
    """Best-of matmul FLOP rate at a DiT-like shape."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = min(_timed(torch.mm, a, b) for _ in range(repeats))
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


def compare(depth: int, frames: int, rows: int, cols: int, text_valid: int, repeats: int) -> list[str]:
    from mochi_preview import load_dit

    lines = []
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
        for dtype in (torch.float32, torch.bfloat16):
            ours = load_dit(tmp, dtype=dtype)
            theirs = theirs32.to(dtype)
            args_ours = (latents, sigma, feats, mask)
            args_theirs = (latents.to(dtype), feats.to(dtype), 1000 * (1 - sigma), mask.long())
            with torch.inference_mode():
                ours(*args_ours), theirs(*args_theirs, return_dict=False)  # warm-up
                t_ours, t_theirs = [], []
                for _ in range(repeats):  # interleaved, so machine noise hits both sides alike
                    t_ours.append(_timed(ours, *args_ours))
                    t_theirs.append(_timed(theirs, *args_theirs, return_dict=False))
            a, b = statistics.median(t_ours), statistics.median(t_theirs)
            rate = matmul_rate(dtype)
            lines.append(
                f"  {str(dtype).removeprefix('torch.'):9s} ours {a:7.3f} s  diffusers {b:7.3f} s  ratio {a / b:5.2f}"
                f"  |  ours {flops / a / 1e9:6.1f} GFLOP/s = {flops / a / rate:4.0%} of matmul {rate / 1e9:.1f} GFLOP/s"
                f"  (diffusers {flops / b / rate:4.0%})"
            )
            del ours
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", action="store_true", help="also one block at 16,000 visual tokens (slow on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for line in compare(depth=2, frames=5, rows=26, cols=46, text_valid=64, repeats=args.repeats):  # 1495 tokens
        print(line)
    if args.long:
        for line in compare(depth=1, frames=16, rows=40, cols=100, text_valid=64, repeats=2):  # 16,000 tokens
            print(line)


if __name__ == "__main__":
    main()
