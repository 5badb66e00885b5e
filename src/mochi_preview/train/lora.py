"""LoRA fine-tuning of the DiT, and its proof on the demo model: `python -m mochi_preview.train.lora --out FILE`.

The base DiT is frozen; each target Linear gets a trainable low-rank update scale * B(A x) (Genmo's defaults: rank 16,
alpha 16, on qkv_x, qkv_y, proj_x, proj_y; the blocks' modulation and MLP Linears can be targets too; A
Kaiming-uniform, B zero, so training starts from the base model). The
loss is `DiTTrainer`'s flow matching in the normalised latent space (noisy input and target both normalised), with
caption dropout; the shared trainer gives AdamW, warm-up then cosine, and exact resume. The result is written in
Genmo's native format (`lora.save_lora_native`), which Genmo's loader, ComfyUI and `mochi_preview.lora` read.

The demo proof teaches the shipped demo model a concept it has never seen: by default a new colour, lime (between
yellow and green, `demo.world.NEW_COLOURS`: a colour the demo VAE can reconstruct, unlike pink or cyan), or with
`--concept still` objects that stay put (the demo DiT was trained on moving objects only). Half the training clips
show the concept, half are the demo's usual training clips (so the old concepts are kept); the evaluator
(`demo.evaluate`, lime among its hues) measures colour and direction from the generated frames, on sentence forms
held out of training, for the base model, the LoRA at strength 1, and at strength 0 (which must equal the base).
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
from ..files import write_atomic
from ..lora import GENMO_TARGETS, TARGETS, LoraSet, attach, save_lora_diffusers, save_lora_native
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
    train_text_encoder: bool = False  # with a text encoder given (fresh captions each step), it stays frozen too


def check_lora_settings(targets, rank: int, alpha: float) -> None:
    """Raise a ValueError naming the valid choices unless the targets, rank and alpha make a LoRA."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or rank < 1 or not math.isfinite(alpha):
        raise ValueError(
            f"LoRA targets must be among {TARGETS} (got {list(targets)}), rank >= 1 (got {rank}) and "
            f"alpha finite (got {alpha})"
        )


def _target(block: nn.Module, target: str) -> tuple[str, nn.Linear | None]:
    """(path under the block, its Linear or None where the block has none: the last has no proj_y nor mlp_y)."""
    path = f"attn.{target}" if target in GENMO_TARGETS else target
    try:
        return path, block.get_submodule(path)
    except AttributeError:
        return path, None


def add_lora(dit: nn.Module, cfg: LoraTrainConfig, generator: torch.Generator) -> dict[str, nn.Linear]:
    """Freeze `dit` and give each target Linear of every block a trainable adapter; -> {native name: layer}."""
    check_lora_settings(cfg.targets, cfg.rank, cfg.alpha)
    dit.requires_grad_(False)
    layers = {}
    for i, block in enumerate(dit.blocks):
        for target in cfg.targets:
            path, layer = _target(block, target)
            if layer is None:
                continue
            A = torch.empty(cfg.rank, layer.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            B = torch.zeros(layer.out_features, cfg.rank)
            device = layer.weight.device  # drawn on the CPU generator whatever the device: the same A everywhere
            attach(layer, ADAPTER, A.to(device), B.to(device), cfg.alpha / cfg.rank, trainable=True)
            layers[f"blocks.{i}.{path}"] = layer
    return layers


class LoraTrainer(DiTTrainer):
    """Flow-matching training of a LoRA on a frozen DiT (`DiTTrainer`'s loss, data and resume)."""

    def __init__(
        self, dit: nn.Module, data: LatentData, cfg: LoraTrainConfig = LoraTrainConfig(), text=None, recaption=None
    ):
        """`text` and `recaption`: as `DiTTrainer`'s (fresh captions of the drawn clips at every step)."""
        self.layers = add_lora(dit, cfg, torch.Generator().manual_seed(cfg.seed + 1))
        super().__init__(dit, data, cfg, text, recaption)

    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{native layer: (A, B)} as trained."""
        return {n: (getattr(m, f"lora_A_{ADAPTER}"), getattr(m, f"lora_B_{ADAPTER}")) for n, m in self.layers.items()}

    def export(self, path: str | Path, diffusers: str | Path | None = None) -> Path:
        """Write the LoRA in Genmo's native format (and, with `diffusers`, the diffusers/peft form too)."""
        if diffusers is not None:
            save_lora_diffusers(diffusers, self.lora(), self.cfg.rank, self.cfg.alpha, len(self.model.blocks) - 1)
        return save_lora_native(path, self.lora(), self.cfg.rank, self.cfg.alpha)


# ---- the demo proof -------------------------------------------------------------------------------------------

CONCEPTS = ("lime", "still")
# The proof's settings (the command's defaults): the best of the attempts in bench/RESULTS.md ("LoRA").
PROOF_STEPS, PROOF_LR, PROOF_RANK, PROOF_TARGETS = 7000, 8e-3, 32, (*GENMO_TARGETS, "mod_x", "mod_y")
STRENGTH0_PROMPTS = 16  # strength 0 is checked bit for bit against the base on the first batch of each prompt set


def concept_combos(concept: str) -> list[Attributes]:
    """The combinations that show a concept: "lime" in every shape and motion, or every colour and shape "still"."""
    if concept == "lime":
        return [Attributes("lime", s, d) for s in SHAPES for d in MOVES]
    if concept == "still":
        return [Attributes(c, s, "still") for c in COLOURS for s in SHAPES]
    raise ValueError(f"concept must be one of {CONCEPTS}; got {concept!r}")


def shows(concept: str, seen) -> bool:
    """Whether an `Observation` shows the concept."""
    return seen.colour == "lime" if concept == "lime" else seen.direction == "still"


def demo_attributes(rng: np.random.Generator, n: int, concept: str = "lime", share: float = 0.5) -> list[Attributes]:
    """n attribute triples: `share` of them show the concept, the rest are the demo's training combinations."""
    new, old = concept_combos(concept), combos("train", MOVES)
    pools = [new if rng.random() < share else old for _ in range(n)]
    return [pool[rng.integers(len(pool))] for pool in pools]


def recaptioner(n: int, seed: int, concept: str = "lime", share: float = 0.5):
    """(clip indices, rng) -> fresh training-form captions of those `demo_clips(n, seed, ...)` clips."""
    attrs = demo_attributes(np.random.default_rng(seed), n, concept, share)  # the same draws as demo_clips'
    return lambda indices, rng: [caption(rng, attrs[i], "train") for i in indices]


def demo_clips(n: int, seed: int, concept: str = "lime", share: float = 0.5):
    """n demo-world clips: `share` of them show the concept, the rest are the demo's training clips;
    -> (videos (n, 3, T, H, W) uint8, captions, attributes)."""
    rng = np.random.default_rng(seed)
    attrs = demo_attributes(rng, n, concept, share)
    world = WorldConfig()
    videos = render(attrs, sample_geometry(rng, attrs, world), world)
    return videos, [caption(rng, a, "train") for a in attrs], attrs


def encode_demo(model_dir: Path, n: int, seed: int, concept: str = "lime", share: float = 0.5) -> LatentData:
    """Encode n clips (`demo_clips`) with the model's VAE encoder and T5, normalised with its latent stats."""
    from ..text import TextEncoder
    from ..vae import load_vae_encoder

    stats = json.loads((model_dir / "latent_stats.json").read_text())
    encoder = load_vae_encoder(model_dir / "encoder.safetensors")
    text = TextEncoder.from_folder(model_dir / "t5")
    videos, captions, _ = demo_clips(n, seed, concept, share)
    batches = ((videos[i : i + 32], captions[i : i + 32]) for i in range(0, n, 32))
    return encode_latent_data(encoder, text, batches, torch.tensor(stats["mean"]), torch.tensor(stats["std"]))


def concept_prompts(concept: str, seed: int = 0, n: int = 60) -> list:
    """n (prompt, attributes) showing the concept, in the held-out sentence forms: prompt i takes combination
    i mod C and sentence form (i div C) mod 5 (lime: its 12 combinations in all 5 forms)."""
    rng = np.random.default_rng(seed)
    cases = concept_combos(concept)
    forms = HELDOUT_TEMPLATES
    return [
        (caption(rng, cases[i % len(cases)], "heldout", forms[(i // len(cases)) % len(forms)]), cases[i % len(cases)])
        for i in range(n)
    ]


def cached_frames(path: Path | None, prompts: list[str], model_dir: Path, make) -> np.ndarray:
    """`make()`'s frames, kept in `path` (.npz) for the same prompts and DiT file: the base model's frames do not
    change between LoRA runs."""
    from ..lora import file_sha256

    key = json.dumps([prompts, file_sha256(model_dir / "dit.safetensors")])
    if path is not None and path.exists():
        with np.load(path) as f:
            if str(f["key"]) == key:
                return f["frames"]
    frames = make()
    if path is not None:

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, frames=frames, key=key)

        write_atomic(path, write, replace=True)
    return frames


def score(videos: np.ndarray, cases: list, concept: str) -> dict:
    """Colour (among the old and new colours) and direction scores, and the share of clips showing the concept."""
    from ..demo.evaluate import ALL_HUES, adherence

    result = adherence(list(videos), [a for _, a in cases], hues=ALL_HUES)
    return result | {"concept": float(np.mean([shows(concept, o) for o in result["observations"]]))}


def evaluate(model_dir: Path, lora: Path | None, concept: str = "lime", seed: int = 0, work: Path | None = None):
    """Scores on the concept's held-out prompts ("new") and the demo's 45 held-out prompts ("old"): base model, the
    LoRA at strength 1, and whether strength 0 gives the base model's frames bit for bit (first batch of each)."""
    from ..demo.evaluate_model import generate, heldout_prompts, model_defaults
    from ..pipeline import MochiPipeline

    pipe = MochiPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    defaults = model_defaults(model_dir)
    out = {}
    for name, cases in {"new": concept_prompts(concept, seed), "old": heldout_prompts(seed)}.items():
        prompts = [p for p, _ in cases]
        cache = work / f"base_{concept}_{name}_{seed}.npz" if work is not None else None
        base = cached_frames(cache, prompts, model_dir, lambda p=prompts: generate(pipe, p, defaults, seed))
        out[f"{name}/base"] = score(base, cases, concept)
        if lora is not None:
            loras = LoraSet(pipe.dit)
            loras.load(lora, "proof", 1.0)
            out[f"{name}/lora"] = score(generate(pipe, prompts, defaults, seed), cases, concept)
            loras.set_adapters("proof", 0.0)
            zero = generate(pipe, prompts[:STRENGTH0_PROMPTS], defaults, seed)
            out[f"{name}/strength0_equal"] = bool(np.array_equal(zero, base[: len(zero)]))
            loras.unload()
    return out


def summary(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, dict):
            rows.append(f"{key:20s} concept {value['concept']:.1%}  colour {value['colour']:.1%}  "
                        f"direction {value['direction']:.1%}  (n={value['n']})")  # fmt: skip
        else:
            rows.append(f"{key:20s} {value}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, default=None, help="default: the demo model shipped in the package")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (Genmo's native format)")
    p.add_argument("--diffusers_out", type=Path, default=None, help="also write the diffusers/peft form here")
    p.add_argument("--work", type=Path, default=None, help="resumable trainer checkpoint and data cache folder")
    p.add_argument("--concept", choices=CONCEPTS, default="lime")
    p.add_argument("--share", type=float, default=0.5, help="share of training clips that show the concept")
    p.add_argument("--clips", type=int, default=512)
    p.add_argument("--steps", type=int, default=PROOF_STEPS)
    p.add_argument("--rank", type=int, default=PROOF_RANK)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank (scale alpha / rank = 1)")
    p.add_argument("--lr", type=float, default=PROOF_LR)
    p.add_argument("--targets", default=",".join(PROOF_TARGETS), help=f"comma-separated, among {','.join(TARGETS)}")
    p.add_argument("--batch_size", type=int, default=LoraTrainConfig.batch_size)
    p.add_argument("--recaption", action="store_true", help="fresh captions of the clips at every step (frozen T5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="score base vs LoRA on held-out prompts afterwards")  # fmt: skip
    args = p.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    args.alpha = float(args.rank) if args.alpha is None else args.alpha
    if args.out.exists():
        raise SystemExit(f"--out {args.out} exists; choose a new file name")
    if not 0.0 < args.share <= 1.0:
        raise SystemExit(f"--share must be in (0, 1]; got {args.share}")
    try:
        check_lora_settings(targets, args.rank, args.alpha)
    except ValueError as e:
        raise SystemExit(f"--targets/--rank/--alpha: {e}") from None
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from ..tiny import default_model_dir

        args.model_dir = default_model_dir()
    from ..dit import load_dit

    start = time.time()
    tag = f"{args.concept}_{args.share}_{args.clips}_{args.seed}"
    cache = args.work / f"data_{tag}.safetensors" if args.work else None
    if cache is not None and cache.exists():
        data = LatentData.load(cache)
    else:
        data = encode_demo(args.model_dir, args.clips, args.seed, args.concept, args.share)
        if cache is not None:
            write_atomic(cache, data.save, replace=True)
    encoded = time.time()
    print(f"{len(data)} clips encoded in {encoded - start:.0f} s", flush=True)
    cfg = LoraTrainConfig(steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, targets=targets,
                          batch_size=args.batch_size, seed=args.seed, threads=args.threads)  # fmt: skip
    dit = load_dit(args.model_dir, dtype=torch.float32)
    text = recaption = None
    if args.recaption:
        from ..text import TextEncoder

        text = TextEncoder.from_folder(args.model_dir / "t5")
        recaption = recaptioner(args.clips, args.seed, args.concept, args.share)
    trainer = LoraTrainer(dit, data, cfg, text, recaption)
    run = f"{tag}_{'-'.join(targets)}_r{cfg.rank}_a{cfg.alpha:g}_lr{cfg.lr:g}_b{cfg.batch_size}_s{cfg.steps}"
    run += "_recaption" if args.recaption else ""
    trainer.fit(checkpoint=args.work / f"trainer_{run}" if args.work else None)
    trainer.export(args.out, args.diffusers_out)
    print(f"trained {cfg.steps} steps in {time.time() - encoded:.0f} s; wrote {args.out}", flush=True)
    result = {"seconds_encode": encoded - start, "seconds_train": time.time() - encoded}
    if args.evaluate:
        result |= evaluate(args.model_dir, args.out, args.concept, args.seed, args.work)
        print(summary(result))
    return result


if __name__ == "__main__":
    main()
