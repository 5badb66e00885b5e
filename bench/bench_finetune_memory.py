"""Fine-tuning memory: measured on this CPU at a reduced size, and a paper estimate for the published model on one GPU.

    python bench/bench_finetune_memory.py [--steps 2] [--markdown FILE]

- measured: one fresh process per option (LoRA or full fine-tuning, gradient checkpointing off or on) trains a
  reduced DiT (8 blocks, width 512) on random latents of a 25-frame 256x256 clip for `--steps` steps, 1 thread, fp32;
  the table gives the process's resident memory before the first step, its peak (ru_maxrss), and the bytes autograd
  kept for the backward pass in one step (counted with saved-tensor hooks, each storage once, weights left out).
- paper estimate: what one training step holds on a GPU for the published DiT (10.0B parameters, 48 blocks) at
  848x480 under bf16 autocast: the base weights (bf16 or fp8), the trained state (LoRA rank 16 on Genmo's four
  attention projections, or every weight: fp32 weights, gradients and two AdamW moments, plus the bf16 copies autocast
  keeps for the backward pass), and the activations. The activations per token are measured, not guessed: the same
  hook count on a DiT of the published shape at 1/8 of every width (head size 128 kept, 3 heads), under CPU bf16
  autocast, at two token counts, scaled by 8 (every saved tensor's width is one of the model's widths). The peak
  allows one extra block of activations for the backward pass's temporaries (two with checkpointing: the recomputed
  block and its gradients). fp8 base weights: 1 byte a weight in the blocks, plus the bf16 copies the fp8 layers
  dequantize, which autograd keeps for the backward pass (every block's without checkpointing). Not counted: the
  CUDA context and allocator slack (1-3 GB), the VAE and T5 (preprocessing runs them once, before training).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mochi_preview.configs import dit_config  # noqa: E402
from mochi_preview.dit import AsymmDiT, DiTConfig, init_weights  # noqa: E402
from mochi_preview.geometry import MOCHI  # noqa: E402
from mochi_preview.train.dit import DiTTrainConfig, DiTTrainer, LatentData  # noqa: E402
from mochi_preview.train.lora import LoraTrainConfig, add_lora  # noqa: E402

GIB = 2**30
REDUCED = dit_config(depth=8, num_heads=8, dim_y=512, text_dim=1024, head_dim=64)
REDUCED_CLIP = (25, 256, 256)  # frames, height, width
TEXT = 64  # caption tokens in the measured runs
PUBLISHED = DiTConfig()
EIGHTH = replace(PUBLISHED, num_heads=3, dim_y=192, mlp_hidden_x=1024, mlp_hidden_y=512)  # every width / 8
GENMO = {37: "50 GB", 61: "64 GB", 79: "69-78 GB", 85: "80 GB"}  # Genmo's README, one H100, checkpointing on


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class SavedBytes:
    """Bytes autograd keeps for the backward pass, each storage once; parameters (and their bf16 autocast copies,
    counted apart) left out."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
        self.seen, self.activations, self.weight_copies = set(), 0, 0

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen and key not in self.params:
            self.seen.add(key)
            if tuple(t.shape) in self.shapes and t.dtype == torch.bfloat16:
                self.weight_copies += storage.nbytes()
            else:
                self.activations += storage.nbytes()
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def model_for(cfg: DiTConfig, mode: str, dtype: torch.dtype, checkpointing: bool) -> AsymmDiT:
    dit = init_weights(AsymmDiT(cfg), generator=torch.Generator().manual_seed(0)).to(dtype)
    for name, p in dit.named_parameters():  # fp32 parts as load_dit keeps them
        if name in dit.fp32_parameter_names():
            p.data = p.data.float()
    dit.gradient_checkpointing = checkpointing
    if mode == "lora":
        add_lora(dit, LoraTrainConfig(rank=16, alpha=16.0), torch.Generator().manual_seed(1))
    else:
        dit.requires_grad_(True)
    return dit.train()


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    _, t, h, w = MOCHI.latent_shape(frames, height, width)
    return t, h, w


# ---- measured on this CPU ------------------------------------------------------------------------------------------


def child(mode: str, checkpointing: bool, steps: int) -> dict:
    """One option in this process: train `steps` steps of the reduced DiT; memory and time."""
    torch.set_num_threads(1)
    t, h, w = latent_grid(*REDUCED_CLIP)
    g = torch.Generator().manual_seed(0)
    data = LatentData(
        torch.randn(4, 12, t, h, w, generator=g),
        torch.randn(4, TEXT, REDUCED.text_dim, generator=g),
        torch.ones(4, TEXT, dtype=torch.bool),
        torch.full((4, 12, t, h, w), -4.0),
    )
    dit = model_for(REDUCED, mode, torch.float32, checkpointing)
    cfg = DiTTrainConfig(batch_size=1, ema_decay=0.0, threads=1, sample_posterior=True, warmup=1, steps=steps)
    trainer = DiTTrainer(dit, data, cfg)
    before = rss()
    with SavedBytes(dit) as saved:
        trainer.loss()[0].backward()  # one step's graph, counted (then undone: gradients cleared below)
    dit.zero_grad(set_to_none=True)
    start = time.time()
    for _ in range(steps):
        trainer.train_step()
    trainable = sum(p.numel() for p in dit.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "checkpointing": checkpointing,
        "params": sum(p.numel() for p in dit.parameters()),
        "trainable": trainable,
        "tokens": MOCHI.tokens(*REDUCED_CLIP),
        "before_gib": before / GIB,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "saved_gib": saved.activations / GIB,
        "s_per_step": (time.time() - start) / steps,
    }


def measured(steps: int) -> list[dict]:
    rows = []
    for mode in ("lora", "full"):
        for checkpointing in (False, True):
            cmd = [sys.executable, __file__, "--child", mode, str(int(checkpointing)), str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


# ---- the paper estimate --------------------------------------------------------------------------------------------


def probe(mode: str, checkpointing: bool, depth: int, frames: int, text: int) -> int:
    """Activation bytes kept by one bf16-autocast forward of the 1/8-width DiT with `depth` blocks, on `frames` latent
    frames of 848x480 (weights bf16 for LoRA, fp32 for full fine-tuning)."""
    dtype = torch.bfloat16 if mode == "lora" else torch.float32
    dit = model_for(replace(EIGHTH, depth=depth), mode, dtype, checkpointing)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, frames, 60, 106, generator=g)  # 848x480 in latents: 30 x 53 tokens a frame
    y = torch.randn(1, text, EIGHTH.text_dim, generator=g)
    with SavedBytes(dit) as saved, torch.autocast("cpu", torch.bfloat16):
        dit(x, torch.tensor([0.5]), y, torch.ones(1, text, dtype=torch.bool))
    return saved.activations


def per_token(mode: str, checkpointing: bool) -> dict[str, float]:
    """The published model's activation bytes, per block: a per visual token, b per text token, c fixed; outside the
    blocks (embedders, RoPE tables, final layer): r per visual token, s per text token, k fixed. From the 1/8-width
    DiT with 1 and 2 blocks, on 1 and 2 latent frames and 64 and 128 text tokens, every figure scaled by 8."""
    n = 30 * 53  # visual tokens in one latent frame
    p = {(d, f, t): probe(mode, checkpointing, d, f, t) for d, f, t in
         ((1, 1, 64), (2, 1, 64), (1, 2, 64), (2, 2, 64), (1, 1, 128), (2, 1, 128))}  # fmt: skip
    block = {(f, t): p[(2, f, t)] - p[(1, f, t)] for f, t in ((1, 64), (2, 64), (1, 128))}
    rest = {key: p[(1, *key)] - block[key] for key in block}
    a, b = (block[(2, 64)] - block[(1, 64)]) / n, (block[(1, 128)] - block[(1, 64)]) / 64
    r, s = (rest[(2, 64)] - rest[(1, 64)]) / n, (rest[(1, 128)] - rest[(1, 64)]) / 64
    c, k = block[(1, 64)] - a * n - b * 64, rest[(1, 64)] - r * n - s * 64
    return {name: 8 * v for name, v in dict(a=a, b=b, c=c, r=r, s=s, k=k).items()}


def activations(coef: dict[str, float], tokens: int, text: int, depth: int = PUBLISHED.depth) -> float:
    return (
        depth * (coef["a"] * tokens + coef["b"] * text + coef["c"]) + coef["r"] * tokens + coef["s"] * text + coef["k"]
    )


def estimate() -> list[dict]:
    with torch.device("meta"):
        meta = AsymmDiT(PUBLISHED)
    params = sum(p.numel() for p in meta.parameters())
    in_blocks = sum(p.numel() for n, p in meta.named_parameters() if n.startswith("blocks.") and p.ndim == 2)
    lora = sum(16 * (m.in_features + m.out_features) for b in meta.blocks for m in (b.attn.qkv_x, b.attn.qkv_y,
               b.attn.proj_x, b.attn.proj_y) if m is not None)  # fmt: skip
    rates = {(m, c): per_token(m, c) for m in ("lora", "full") for c in (False, True)}
    rows = []
    for frames in (37, 85, 163):
        n, text = MOCHI.tokens(frames, 480, 848), 256
        for mode, base in (("lora", "bf16"), ("lora", "fp8"), ("full", "fp32 + AdamW")):
            if mode == "lora":
                weights = (params * 2 if base == "bf16" else (params - in_blocks) * 2 + in_blocks) / GIB
                state = lora * 16 / GIB  # fp32 weights, gradients, two moments
            else:
                weights = params * 4 / GIB  # fp32 master weights
                state = (params * 12 + params * 2) / GIB  # gradients, two moments; bf16 copies autocast keeps
            for checkpointing in (False, True):
                # fp8 Linears dequantize in the forward, and autograd keeps each bf16 copy for the backward pass:
                # all 48 blocks' without checkpointing, one block's at a time with it.
                copies = in_blocks * 2 / (PUBLISHED.depth if checkpointing else 1) if base == "fp8" else 0
                acts = activations(rates[(mode, checkpointing)], n, text) / GIB
                one_block = activations(rates[(mode, False)], n, text, depth=1) - activations(
                    rates[(mode, False)], n, text, depth=0
                )
                extra = one_block * (2 if checkpointing else 1) / GIB
                rows.append({"frames": frames, "tokens": n, "mode": mode, "base": base,
                             "checkpointing": checkpointing, "weights": weights + copies / GIB, "state": state,
                             "activations": acts, "total": weights + copies / GIB + state + acts + extra})  # fmt: skip
    return rows


def markdown(rows: list[dict], est: list[dict], steps: int) -> str:
    t, h, w = latent_grid(*REDUCED_CLIP)
    lines = [
        "## Fine-tuning memory",
        "",
        "Command: `python bench/bench_finetune_memory.py` (see its docstring for the method).",
        "",
        f"Measured on this CPU (1 thread, fp32): reduced DiT {rows[0]['params'] / 1e6:.1f}M parameters (8 blocks, "
        f"width 512), a {REDUCED_CLIP[0]}-frame {REDUCED_CLIP[2]}x{REDUCED_CLIP[1]} clip ({rows[0]['tokens']} visual "
        f"+ {TEXT} text tokens), batch 1, {steps} steps.",
        "",
        "| option | checkpointing | trainable | RSS before | peak RSS | peak - before | kept for backward | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['trainable'] / 1e6:.2f}M | "
            f"{r['before_gib']:.2f} GiB | {r['peak_gib']:.2f} GiB | {r['peak_gib'] - r['before_gib']:.2f} GiB | "
            f"{r['saved_gib']:.2f} GiB | {r['s_per_step']:.1f} |"
        )
    lines += [
        "",
        "Paper estimate, published DiT on one GPU, 848x480, batch 1, bf16 autocast, 256 text tokens (GiB; "
        "activations measured per token on a 1/8-width model and scaled; CUDA context and allocator slack not "
        "included). Genmo's published figures (one H100, LoRA, bf16, their partial per-block checkpointing on all 48 "
        "blocks): " + ", ".join(f"{f} frames {v}" for f, v in GENMO.items()) + ".",
        "",
        "| frames | tokens | training | checkpointing | weights | trained state | activations | peak | Genmo |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in est:
        genmo = (
            GENMO.get(r["frames"], "-") if r["mode"] == "lora" and r["base"] == "bf16" and r["checkpointing"] else ""
        )
        lines.append(
            f"| {r['frames']} | {r['tokens']} | {r['mode']} ({r['base']}) | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['weights']:.1f} | {r['state']:.1f} | {r['activations']:.1f} | **{r['total']:.0f}** | {genmo} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, checkpointing, steps = args.child
        print(json.dumps(child(mode, checkpointing == "1", int(steps))))
        return
    torch.set_num_threads(1)
    text = markdown(measured(args.steps), estimate(), args.steps)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
