"""LoRA fine-tuning of the DiT, and its proof on the demo model: `python -m mochi_preview.train.lora --out FILE`.

The base DiT is frozen; each target Linear gets a trainable low-rank update scale * B(A x) (Genmo's defaults: rank 16,
alpha 16, on qkv_x, qkv_y, proj_x, proj_y; A Kaiming-uniform, B zero, so training starts from the base model). The
loss is `DiTTrainer`'s flow matching in the normalised latent space (noisy input and target both normalised), with
caption dropout; the shared trainer gives AdamW, warm-up then cosine, and exact resume. The result is written in
Genmo's native format (`lora.save_lora_native`), which Genmo's loader, ComfyUI and `mochi_preview.lora` read.

The demo proof teaches the shipped demo model a motion it has never seen: objects that stay still ("a red square
sits in one spot"; the demo DiT was trained on moving objects only). Training clips are half still, half the usual
moving ones (so the old concepts are kept); the evaluator (`demo.evaluate`) measures colour and direction, "still"
included, from the generated frames, on sentence forms held out of training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..demo.world import (
    COLOURS,
    HELDOUT_TEMPLATES,
    MOVES,
    SHAPES,
    Attributes,
    WorldConfig,
    caption,
    combos,
    render,
    sample_geometry,
)
from ..lora import GENMO_TARGETS, attach, save_lora_diffusers, save_lora_native
from .dit import DiTTrainConfig, DiTTrainer, LatentData, encode_latent_data

ADAPTER = "train"  # the live adapter name of the LoRA being trained


@dataclass(frozen=True)
class LoraTrainConfig(DiTTrainConfig):
    """DiT training settings plus the LoRA's rank, alpha and target attention projections."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = GENMO_TARGETS
    steps: int = 300
    lr: float = 2e-3
    warmup: int = 20
    batch_size: int = 16
    ema_decay: float = 0.0  # the LoRA is exported as trained; no EMA (its shadow of the frozen DiT costs memory)
    checkpoint_every: int = 100


def add_lora(dit: nn.Module, cfg: LoraTrainConfig, generator: torch.Generator) -> dict[str, nn.Linear]:
    """Freeze `dit` and give each target Linear of every block a trainable adapter; -> {native name: layer}."""
    unknown = [t for t in cfg.targets if t not in GENMO_TARGETS]
    if unknown or cfg.rank < 1 or not math.isfinite(cfg.alpha):
        raise ValueError(
            f"LoRA targets must be among {GENMO_TARGETS} (got {list(cfg.targets)}), rank >= 1 (got {cfg.rank}) and "
            f"alpha finite (got {cfg.alpha})"
        )
    dit.requires_grad_(False)
    layers = {}
    for i, block in enumerate(dit.blocks):
        for target in cfg.targets:
            layer = getattr(block.attn, target)
            if layer is None:  # the last block has no proj_y
                continue
            A = torch.empty(cfg.rank, layer.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B = torch.zeros(layer.out_features, cfg.rank)
            attach(layer, ADAPTER, A, B, cfg.alpha / cfg.rank, trainable=True)
            layers[f"blocks.{i}.attn.{target}"] = layer
    return layers


class LoraTrainer(DiTTrainer):
    """Flow-matching training of a LoRA on a frozen DiT (`DiTTrainer`'s loss, data and resume)."""

    def __init__(self, dit: nn.Module, data: LatentData, cfg: LoraTrainConfig = LoraTrainConfig()):
        self.layers = add_lora(dit, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        super().__init__(dit, data, cfg)

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{native layer: (A, B)} as trained."""
        return {n: (getattr(m, f"lora_A_{ADAPTER}"), getattr(m, f"lora_B_{ADAPTER}")) for n, m in self.layers.items()}

    def export(self, path: str | Path, diffusers: str | Path | None = None) -> Path:
        """Write the LoRA in Genmo's native format (and, with `diffusers`, the diffusers/peft form too)."""
        if diffusers is not None:
            save_lora_diffusers(diffusers, self.lora(), self.cfg.rank, self.cfg.alpha)
        return save_lora_native(path, self.lora(), self.cfg.rank, self.cfg.alpha)


# ---- the demo proof -------------------------------------------------------------------------------------------


def demo_clips(n: int, seed: int, still_share: float = 0.5):
    """n demo-world clips of the training split: `still_share` of them still, the rest moving as in the demo's
    training; -> (videos (n, 3, T, H, W) uint8, captions, attributes)."""
    rng = np.random.default_rng(seed)
    world = WorldConfig(directions=(*MOVES, "still"))
    still, moving = [Attributes(c, s, "still") for c in COLOURS for s in SHAPES], combos("train", MOVES)
    pools = [still if rng.random() < still_share else moving for _ in range(n)]
    attrs = [pool[rng.integers(len(pool))] for pool in pools]
    videos = render(attrs, sample_geometry(rng, attrs, world), world)
    return videos, [caption(rng, a, "train") for a in attrs], attrs


def encode_demo(model_dir: Path, n: int, seed: int) -> LatentData:
    """Encode n clips (`demo_clips`) with the model's VAE encoder and T5, normalised with its latent stats."""
    from ..text import TextEncoder
    from ..vae import load_vae_encoder

    stats = json.loads((model_dir / "latent_stats.json").read_text())
    encoder = load_vae_encoder(model_dir / "encoder.safetensors")
    text = TextEncoder.from_folder(model_dir / "t5")
    videos, captions, _ = demo_clips(n, seed)
    batches = ((videos[i : i + 32], captions[i : i + 32]) for i in range(0, n, 32))
    return encode_latent_data(encoder, text, batches, torch.tensor(stats["mean"]), torch.tensor(stats["std"]))


def still_prompts(seed: int = 0) -> list:
    """(prompt, attributes) for every colour x shape kept still, in the held-out sentence forms (in turn)."""
    rng = np.random.default_rng(seed)
    cases = [Attributes(c, s, "still") for c in COLOURS for s in SHAPES]
    return [(caption(rng, a, "heldout", HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)]), a) for i, a in enumerate(cases)]


def evaluate(model_dir: Path, lora: Path | None, seed: int = 0) -> dict:
    """Scores on the held-out still prompts and the demo's 45 held-out moving prompts: base model, the LoRA at
    strength 1, and whether strength 0 gives the base model's frames bit for bit."""
    from ..demo.evaluate import adherence
    from ..demo.evaluate_model import generate, heldout_prompts, model_defaults
    from ..lora import LoraSet
    from ..pipeline import MochiPipeline

    pipe = MochiPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    defaults = model_defaults(model_dir)
    sets = {"still": still_prompts(seed), "moving": heldout_prompts(seed)}
    score = lambda videos, cases: adherence(list(videos), [a for _, a in cases])
    out = {}
    for name, cases in sets.items():
        prompts = [p for p, _ in cases]
        base = generate(pipe, prompts, defaults, seed)
        out[f"{name}/base"] = score(base, cases)
        if lora is not None:
            loras = LoraSet(pipe.dit)
            loras.load(lora, "proof", 1.0)
            out[f"{name}/lora"] = score(generate(pipe, prompts, defaults, seed), cases)
            loras.set_adapters("proof", 0.0)
            out[f"{name}/strength0_equal"] = bool(np.array_equal(generate(pipe, prompts, defaults, seed), base))
            loras.unload()
    return out


def summary(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows.append(f"{key:14s} colour {value['colour']:.1%}  direction {value['direction']:.1%}  (n={value['n']})")
        else:
            rows.append(f"{key:14s} {value}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, default=None, help="default: the demo model shipped in the package")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (Genmo's native format)")
    p.add_argument("--diffusers_out", type=Path, default=None, help="also write the diffusers/peft form here")
    p.add_argument("--work", type=Path, default=None, help="resumable trainer checkpoint and data cache folder")
    p.add_argument("--clips", type=int, default=512)
    p.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    p.add_argument("--rank", type=int, default=LoraTrainConfig.rank)
    p.add_argument("--alpha", type=float, default=LoraTrainConfig.alpha)
    p.add_argument("--lr", type=float, default=LoraTrainConfig.lr)
    p.add_argument("--batch_size", type=int, default=LoraTrainConfig.batch_size)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="score base vs LoRA on held-out prompts afterwards")
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists; choose a new file name")
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from ..tiny import default_model_dir

        args.model_dir = default_model_dir()
    from ..dit import load_dit

    start = time.time()
    cache = args.work / "data.safetensors" if args.work else None
    if cache is not None and cache.exists():
        data = LatentData.load(cache)
    else:
        data = encode_demo(args.model_dir, args.clips, args.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            data.save(cache)
    encoded = time.time()
    print(f"{len(data)} clips encoded in {encoded - start:.0f} s")
    cfg = LoraTrainConfig(steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
                          batch_size=args.batch_size, seed=args.seed, threads=args.threads)  # fmt: skip
    dit = load_dit(args.model_dir, dtype=torch.float32)
    trainer = LoraTrainer(dit, data, cfg)
    trainer.fit(checkpoint=args.work / "trainer" if args.work else None)
    trainer.export(args.out, args.diffusers_out)
    print(f"trained {cfg.steps} steps in {time.time() - encoded:.0f} s; wrote {args.out}")
    result = {"seconds_encode": encoded - start, "seconds_train": time.time() - encoded}
    if args.evaluate:
        result |= evaluate(args.model_dir, args.out, args.seed)
        print(summary(result))
    return result


if __name__ == "__main__":
    main()
