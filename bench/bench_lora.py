"""LoRA costs: the time to merge one into the weights, and the per-step overhead of applying it live.

    python bench/bench_lora.py [--threads 1] [--repeats 7] [--rank 16]

- merge: `load_lora` (read + check + merge in fp32) of a rank-r LoRA on Genmo's four attention projections of the
  demo DiT, against loading the DiT itself; and the merge of one published-size layer (`qkv_x`, 9216 x 3072, bf16),
  times the 191 such layers of the published model (an estimate: the four layer kinds differ in size).
- live: one CFG sampling step of the demo DiT at its own clip size (batch 2: conditional and unconditional) with no
  LoRA, with one and with three live LoRAs, and with one merged (which must cost nothing): medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mochi_preview.dit import load_dit  # noqa: E402
from mochi_preview.lora import (  # noqa: E402
    GENMO_TARGETS,
    LayerLora,
    LoraSet,
    load_lora,
    merge_lora,
    read_lora,
    save_lora_native,
)
from mochi_preview.tiny import default_model_dir  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_lora(dit, rank: int, path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i, block in enumerate(dit.blocks):
        for t in GENMO_TARGETS:
            if (layer := getattr(block.attn, t)) is not None:
                pairs[f"blocks.{i}.attn.{t}"] = (
                    torch.randn(rank, layer.in_features, generator=g) * 0.01,
                    torch.randn(layer.out_features, rank, generator=g) * 0.01,
                )
    return save_lora_native(path, pairs, rank, float(rank))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = default_model_dir()
    base = load_dit(model_dir, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp())
    files = [random_lora(base, args.rank, tmp / f"l{i}.safetensors", i) for i in range(3)]

    t_load = median_time(lambda: load_dit(model_dir, dtype=torch.float32), args.repeats)
    t_read = median_time(lambda: read_lora(files[0], base), args.repeats)
    lora, fresh = read_lora(files[0], base), load_dit(model_dir, dtype=torch.float32)
    t_merge = median_time(lambda: merge_lora(fresh, lora), args.repeats)  # merging again and again: same work
    print(f"demo DiT: load {t_load * 1e3:.1f} ms; a rank-{args.rank} LoRA: read + check {t_read * 1e3:.1f} ms, "
          f"merge {t_merge * 1e3:.1f} ms (x{(t_read + t_merge) / t_load:.2f} the DiT's load)")  # fmt: skip

    w = torch.randn(9216, 3072).to(torch.bfloat16)
    layer = LayerLora(torch.randn(args.rank, 3072) * 0.01, torch.randn(9216, args.rank) * 0.01, 1.0)
    t_layer = median_time(lambda: w.copy_((w.float() + layer.delta()).to(w.dtype)), max(3, args.repeats // 2))
    print(f"published qkv_x (9216x3072 bf16): merge {t_layer * 1e3:.0f} ms; x191 layers ~ {191 * t_layer:.0f} s "
          "(an upper bound: qkv_y, proj_x, proj_y are 1/2, 1/3, 1/6 of its size)")  # fmt: skip

    cfg = base.cfg
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, cfg.in_channels, 5, 8, 8, generator=g)  # the demo clip: 25 frames of 64x64
    text, mask = torch.randn(2, 40, cfg.text_dim, generator=g), torch.ones(2, 40, dtype=torch.bool)
    sigma = torch.tensor([0.5, 0.5])

    def step(dit):
        with torch.no_grad():
            dit(latents, sigma, text, mask)

    plain = load_dit(model_dir, dtype=torch.float32)
    merged = load_lora(load_dit(model_dir, dtype=torch.float32), files[0])
    live1, live3 = load_dit(model_dir, dtype=torch.float32), load_dit(model_dir, dtype=torch.float32)
    LoraSet(live1).load(files[0])
    three = LoraSet(live3)
    for f in files:
        three.load(f, strength=0.5)
    rows = {"no LoRA": plain, "merged": merged, "live, 1 LoRA": live1, "live, 3 LoRAs": live3}
    samples = {name: [] for name in rows}
    for dit in rows.values():
        step(dit)  # warm-up
    for _ in range(args.repeats):  # interleaved rounds: the machine's load drifts alike for every row
        for name, dit in rows.items():
            start = time.perf_counter()
            step(dit)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(s) for name, s in samples.items()}
    for name, t in times.items():
        print(f"demo DiT step (batch 2): {name:14s} {t * 1e3:7.1f} ms  x{t / times['no LoRA']:.3f}")


if __name__ == "__main__":
    main()
