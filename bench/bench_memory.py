"""Device memory of each pipeline memory mode at 848x480 for 31, 85 and 163 frames.

Computed from the published model sizes (built on the meta device, so nothing is allocated) and from activation
costs *measured* here at reduced sizes:
- DiT activations: peak memory of one full-width block's forward, measured at a few token counts in fresh processes
  (peak RSS minus the RSS before the forward); the per-token slope is extrapolated to 9,540 / 23,850 / 44,520 tokens.
  Measured in fp32 (bf16 matmuls crawl on CPUs without bf16 instructions): an upper bound for bf16.
- VAE decode: the decoder's own estimate (vae/decode.py, factors measured on this CPU; see the VAE section of
  bench/RESULTS.md), for the full decode and for the plan the automatic mode picks under a budget.

    python bench/bench_memory.py [--tokens 500 1000 2000] [--budget-gib 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

GIB = 2**30
CHILD = r"""
import json, sys, torch
from mochi_preview.dit import AsymmDiT, DiTConfig
torch.set_num_threads(2)
tokens, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
with torch.device("meta"):
    model = AsymmDiT(DiTConfig(depth=1))
model = model.to_empty(device="cpu").to(dtype)
for p in model.parameters():
    torch.nn.init.normal_(p, 0, 0.02)
rows = 30  # one latent frame of 30 x cols latent pixels -> 15 x cols/2 tokens
cols = 2 * (tokens // (rows // 2))
z = torch.randn(1, 12, 1, rows, cols)
feats, mask = torch.randn(1, 256, 4096), torch.zeros(1, 256, dtype=torch.bool)
mask[0, :64] = True
def rss(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
with torch.inference_mode():
    model(z, torch.tensor([0.5]), feats, mask)  # warm-up: allocator and kernels
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
    before = rss("VmRSS")
    model(z, torch.tensor([0.5]), feats, mask)
    peak = rss("VmHWM")
print(json.dumps({"tokens": rows // 2 * cols // 2, "bytes": peak - before}))
"""


def measure_dit_activations(token_counts: list[int], dtype: str) -> list[tuple[int, int]]:
    points = []
    for n in token_counts:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), dtype], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        points.append((r["tokens"], r["bytes"]))
    return points


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per token through the measured points."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def weight_bytes() -> dict[str, float]:
    from transformers import T5Config, T5EncoderModel

    from mochi_preview.dit import AsymmDiT, DiTConfig
    from mochi_preview.vae import Decoder, DecoderConfig

    with torch.device("meta"):
        dit = AsymmDiT(DiTConfig())
        decoder = Decoder(DecoderConfig())
        t5 = T5EncoderModel(
            T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
        )
    count = lambda m: sum(p.numel() for p in m.parameters())
    block = lambda blocks: max(count(b) for b in blocks)
    return {
        "dit_bf16": 2 * count(dit),
        "dit_block_bf16": 2 * block(dit.blocks),
        "dit_rest_bf16": 2 * (count(dit) - sum(count(b) for b in dit.blocks)),
        "t5_fp32": 4 * count(t5),
        "t5_block_fp32": 4 * block(t5.encoder.block),
        "t5_rest_fp32": 4 * (count(t5) - sum(count(b) for b in t5.encoder.block)),
        "vae_bf16": 2 * count(decoder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[480, 960, 1920])
    parser.add_argument("--budget-gib", type=float, default=8.0, help="VAE budget for the automatic plan")
    args = parser.parse_args()

    from mochi_preview.vae import DecoderConfig, estimate_decode_bytes, plan_decode

    w = weight_bytes()
    print("weights (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in w.items()))
    per_token = {}
    # bf16 matmuls are ~400x slower than fp32 on CPUs without bf16 instructions (this one), so activations are
    # measured in fp32 and used as an upper bound for bf16 (whose norms and RoPE also work in fp32 temporaries).
    for dtype in ("float32",):
        points = measure_dit_activations(args.tokens, dtype)
        per_token[dtype] = slope(points)
        shown = ", ".join(f"{n} tok: {b / 2**20:.0f} MiB" for n, b in points)
        print(f"DiT block activations, {dtype}: {shown} -> {per_token[dtype] / 1024:.1f} KiB/token")

    cfg = DecoderConfig()
    head = ["frames", "tokens", "DiT act.", "VAE full", f"VAE auto ({args.budget_gib:g} GiB)", "resident"]
    print("\n| " + " | ".join([*head, "model offload", "sequential offload"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for frames in (31, 85, 163):
        t = (frames - 1) // 6 + 1
        tokens = t * 30 * 53
        act = per_token["float32"] * tokens
        vae_full = estimate_decode_bytes(cfg, 1, t, 60, 106, torch.bfloat16, streaming=False)
        plan = plan_decode(cfg, (1, 12, t, 60, 106), torch.bfloat16, int(args.budget_gib * GIB))
        vae_auto = plan.estimated_bytes
        resident = w["t5_fp32"] + w["dit_bf16"] + w["vae_bf16"] + max(act, vae_auto)
        model = max(w["t5_fp32"], w["dit_bf16"] + act, w["vae_bf16"] + vae_auto)
        sequential = max(
            w["t5_rest_fp32"] + w["t5_block_fp32"],
            w["dit_rest_bf16"] + w["dit_block_bf16"] + act,
            w["vae_bf16"] + vae_auto,
        )
        plan_text = f"{plan.tiles[0]}x{plan.tiles[1]} tiles, chunk {plan.frames_per_chunk or 'all'}"
        print(
            f"| {frames} | {tokens:,} | {act / GIB:.1f} | {vae_full / GIB:.1f} | {vae_auto / GIB:.1f} ({plan_text}) | "
            f"{resident / GIB:.1f} | {model / GIB:.1f} | {sequential / GIB:.1f} |"
        )


if __name__ == "__main__":
    main()
