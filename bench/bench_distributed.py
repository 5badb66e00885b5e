"""Context parallelism: one generation with 1 process x 2 threads, then 2 processes x 1 thread (torchrun, gloo, CPU),
with the speed-up and the bytes each rank sends per step; then a projection for 2, 4 and 8 H100s at 848x480x163.

The model is a reduced DiT (4 blocks, width 512) on a 37-frame 240x416 latent (2,730 visual tokens), random weights:
the work per token is what matters, not what the video shows. The decoder bench uses a half-width decoder.

    python bench/bench_distributed.py [--steps 4] [--skip-vae]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mochi_preview.configs import dit_config
from mochi_preview.dit import AsymmDiT, init_weights
from mochi_preview.sampling import TextCondition, denoise, get_noise, linear_quadratic_schedule
from mochi_preview.vae import Decoder, DecoderConfig, decode

CONFIG = dit_config(depth=4, num_heads=8, dim_y=256, text_dim=256, head_dim=64)
VIDEO = dict(num_frames=37, height=240, width=416)  # latent (12, 7, 30, 52): 7 x 15 x 26 = 2,730 tokens
TEXT_LEN, COND_VALID, UNCOND_VALID = 256, 40, 1
DECODER = DecoderConfig(channels=(64, 128, 256, 384))
DECODE_LATENT = (1, 12, 4, 16, 24)  # -> 19 frames of 128 x 192


def make_model() -> AsymmDiT:
    return init_weights(AsymmDiT(CONFIG), generator=torch.Generator().manual_seed(0)).eval()


def make_inputs():
    g = torch.Generator().manual_seed(1)
    z = get_noise(1, **VIDEO, seed=2)
    texts = []
    for valid in (COND_VALID, UNCOND_VALID):
        feats = torch.randn(1, TEXT_LEN, CONFIG.text_dim, generator=g)
        mask = torch.zeros(1, TEXT_LEN, dtype=torch.bool)
        mask[:, :valid] = True
        texts.append(TextCondition(feats, mask))
    return z, texts[0], texts[1]


def generate(model, steps: int, cfg_parallel: bool = False, cp=None) -> dict:
    """The sampler with CFG -> latents; wall and CPU seconds per step (steady state); this rank's bytes sent per step.

    CPU seconds count this process's threads: on a shared machine they show the work each rank does, which wall
    time (waiting for the cores other jobs hold) does not.
    """
    z, cond, uncond = make_inputs()
    wall, cpu, sent = [time.perf_counter()], [time.process_time()], [0]

    def tick(i, sigma, z):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        sent.append(cp.bytes_sent if cp is not None else 0)

    if cfg_parallel:
        from mochi_preview.distributed import CFGParallelDiT

        model = CFGParallelDiT(model, cp)
    with torch.inference_mode():
        out = denoise(model, z, linear_quadratic_schedule(steps), cond, uncond, 4.5, cfg_parallel, callback=tick)
    per_step = lambda marks: (marks[-1] - marks[1]) / (steps - 1)  # the first step is a warm-up
    return {"latents": out, "seconds": per_step(wall), "cpu": per_step(cpu), "sent": per_step(sent)}


def make_decoder() -> Decoder:
    torch.manual_seed(3)
    return Decoder(DECODER).eval()


def decode_latents() -> torch.Tensor:
    return torch.randn(DECODE_LATENT, generator=torch.Generator().manual_seed(4))


def worker(args) -> None:
    """One rank under torchrun: the same generation, this rank's share of it."""
    import torch.distributed as dist

    from mochi_preview.distributed import ContextParallel, init_distributed

    torch.set_num_threads(1)
    device = init_distributed(device="cpu")  # gloo, also on a machine with GPUs: this bench measures CPU processes
    cp = ContextParallel(cfg_parallel=args.mode == "cfg", device=device)
    model = make_model()
    model.set_token_layout(cp.token_layout())
    result = generate(model, args.steps, args.mode == "cfg", cp)
    tensors = {"latents": result.pop("latents")}
    if args.mode == "seq" and not args.skip_vae:  # the decode does not depend on the DiT mode: time it once
        with torch.inference_mode():
            decoder, latents = make_decoder(), decode_latents()
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            tensors["video"] = decode(decoder, latents, group=dist.group.WORLD)
            result["decode_seconds"] = time.perf_counter() - start
            result["decode_cpu"] = time.process_time() - cpu
    if cp.is_main:
        torch.save(tensors, args.out + ".pt")
        Path(args.out + ".json").write_text(json.dumps(result))
    dist.barrier()


# ---- projection ------------------------------------------------------------------------------------------------

H100_FLOPS = 989e12  # dense bf16 peak
MFU = 0.6  # fraction of peak a well-tuned DiT block reaches (matmuls and flash attention alike)
LINKS = {"NVLink 4 (450 GB/s per direction)": 450e9, "PCIe 5 x16 (64 GB/s per direction)": 64e9}


def published_costs(tokens: int = 44_520, text: int = 256, depth: int = 48) -> dict:
    """FLOPs of one DiT forward and bytes one rank sends per block per forward, published sizes, bf16."""
    dx, dy, hx, hy = 3072, 1536, 8192, 4096
    seq = tokens + text
    per_token_x = 2 * (dx * 3 * dx + dx * dx + dx * 2 * hx + hx * dx)  # qkv, proj, SwiGLU w1 and w2
    per_token_y = 2 * (dy * 3 * dx + dx * dy + dy * 2 * hy + hy * dy)
    attention = 4 * seq * seq * dx  # QK^T and AV over all heads
    flops = depth * (tokens * per_token_x + text * per_token_y + attention)
    return {"flops": flops, "a2a_bytes_per_token": 2 * (3 * dx + dx), "tokens": tokens, "depth": depth}


def projection() -> str:
    """Markdown table: seconds per 64-step CFG generation (2 forwards a step) on G H100s, compute and all-to-alls
    added up (no overlap assumed), per parallel layout and link."""
    c = published_costs()
    steps, rate = 64, H100_FLOPS * MFU
    one = 2 * steps * c["flops"] / rate
    rows = [
        "| GPUs | layout | compute s | sent per rank per step | "
        + " | ".join(f"total s (speed-up), {k}" for k in LINKS)
        + " |",
        "|---|---|---|---|" + "---|" * len(LINKS),
        f"| 1 | - | {one:.0f} | 0 | " + " | ".join(f"{one:.0f} (1.0)" for _ in LINKS) + " |",
    ]
    for g in (2, 4, 8):
        for layout, seq, forwards in (("sequence", g, 2), ("CFG x sequence", g // 2, 1)):
            # Per forward each rank sends (G-1)/G of its N/G tokens' qkv and attention output in the all-to-alls.
            a2a = c["depth"] * c["tokens"] / seq * c["a2a_bytes_per_token"] * (seq - 1) / seq
            velocity = 12 * 28 * 60 * 106 * 4 if layout != "sequence" else 0  # fp32 velocity swap, once a step
            per_step = forwards * a2a + velocity
            totals = [one / g + steps * per_step / bw for bw in LINKS.values()]
            label = "CFG only" if seq == 1 else layout
            cells = " | ".join(f"{t:.0f} ({one / t:.2f})" for t in totals)
            rows.append(f"| {g} | {label} | {one / g:.0f} | {per_step / 1e9:.2f} GB | {cells} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="sampling steps (the first is a warm-up)")
    p.add_argument("--skip-vae", action="store_true", help="do not time the split VAE decode")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["seq", "cfg"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is a warm-up)")
    runs = {}
    # 1 thread for scale: how well do 2 threads in one process use the 2 cores?
    for threads, name in ((1, "1 process x 1 thread"), (2, "1 process x 2 threads")):
        torch.set_num_threads(threads)
        runs[name] = generate(make_model(), args.steps)
        print(f"{name}: {runs[name]['seconds']:.2f} s/step", flush=True)
    ref = runs["1 process x 2 threads"]["latents"]
    if not args.skip_vae:
        with torch.inference_mode():
            decoder, latents = make_decoder(), decode_latents()
            start, cpu = time.perf_counter(), time.process_time()
            video_ref = decode(decoder, latents, mode="full")
            decode_single, decode_single_cpu = time.perf_counter() - start, time.process_time() - cpu

    names = {"seq": "2 processes x 1 thread, sequence parallel", "cfg": "2 processes x 1 thread, CFG parallel"}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, name in names.items():
            out = str(Path(tmp) / mode)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
            cmd += [__file__, "--worker", "--mode", mode, "--out", out, "--steps", str(args.steps)]
            cmd += ["--skip-vae"] if args.skip_vae else []
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs[name] = json.loads(Path(out + ".json").read_text())
            tensors = torch.load(out + ".pt")
            runs[name]["err"] = float((tensors["latents"] - ref).abs().max() / ref.abs().max())
            if "video" in tensors:
                decode_split, decode_cpu = runs[name]["decode_seconds"], runs[name]["decode_cpu"]
                decode_err = float((tensors["video"] - video_ref).abs().max() / video_ref.abs().max())
            print(f"{name}: {runs[name]['seconds']:.2f} s/step", flush=True)

    base = runs["1 process x 2 threads"]["seconds"]
    tokens = 7 * 15 * 26
    print(f"\nDiT: {CONFIG.depth} blocks, width {CONFIG.dim_x}, {CONFIG.num_heads} heads; {tokens} visual tokens, CFG")
    print("| run | s/step | speed-up vs 1 x 2 | CPU s/step (per rank) | sent per rank per step | max rel. error |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        sent = f"{r['sent'] / 1e6:.1f} MB" if "err" in r else "-"
        err = f"{r['err']:.1e}" if "err" in r else "-"
        print(f"| {name} | {r['seconds']:.2f} | {base / r['seconds']:.2f} | {r['cpu']:.2f} | {sent} | {err} |")
    if not args.skip_vae:
        print(f"\nDecoder {DECODER.channels}, latent {DECODE_LATENT}:")
        print("| run | seconds | speed-up | CPU s (per rank) | max rel. error of the frames |\n|---|---|---|---|---|")
        print(f"| 1 process x 2 threads | {decode_single:.2f} | 1.00 | {decode_single_cpu:.2f} | - |")
        speedup = decode_single / decode_split
        row = f"{decode_split:.2f} | {speedup:.2f} | {decode_cpu:.2f} | {decode_err:.1e}"
        print(f"| 2 processes x 1 thread, time split (rank 0) | {row} |")
    print("\nProjection, 848x480x163 (44,520 tokens), 48 blocks of width 3072, 64 steps with CFG, bf16:")
    print(projection())


if __name__ == "__main__":
    main()
