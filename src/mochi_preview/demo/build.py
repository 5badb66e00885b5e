"""Build the demo model from scratch: `python -m mochi_preview.demo.build --out DIR [--threads 2]`.

Stages, each resumable (trainers checkpoint under `--work`; finished stages are skipped):
1. a tiny T5 (random T5 v1.1 architecture) and its sentencepiece tokenizer, written to `WORK/t5_init/`, then
   taught to name the colour, shape and direction of training captions (`mochi_preview.train.text`) and frozen,
   `WORK/t5/`: a random T5 hardly sees word order ("from left to right" vs "from right to left");
2. the VAE (reconstruction + object colour + KL) on clips of at most 32x32 and 13 frames (or single frames), then
   fine-tuned on longer or larger clips (the model's own `--size` and `--frames` unless `--vae_finetune_size` /
   `--vae_finetune_frames` say less); then a check of its reconstructions at the model's size (`vae_check`);
3. the latent statistics (per-channel mean/std, the demo's normalization constants) and a cache of encoded clips;
4. the DiT, trained with flow matching on that cache (the cached captions' features from the frozen T5 by default;
   for the experiments in bench/RESULTS.md: `--text_encoder frozen` keeps the random T5, `trained` trains it along
   with the DiT, `--captions fresh` draws a new caption for each clip at every step, `--tokenizer captions` trains
   the tokenizer on the world's captions);
5. with `--decoder_steps`, the decoder alone fine-tuned on noisy latents (the encoder, the cache and the DiT stay
   as they are): the DiT's latents are never exactly an encoder's, and a decoder that saw only those drew the
   difference as stray marks beside the object (`polish_decoder`);
6. export in the published native layout (dit/decoder/encoder.safetensors, t5/) plus `mochi_defaults.json` and
   `latent_stats.json`, then the adherence evaluation (`evaluate_model`).

The same command and `--seed` give byte-identical files, whether the build ran straight or was stopped and run again
(tests/demo/test_build_reproducible.py): every model starts from seeded weights and every stage from its checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..configs import CONFIGS
from ..dit import AsymmDiT, init_weights, save_dit_native
from ..files import atomic_dir, write_atomic
from ..geometry import MOCHI
from ..text import TextEncoder
from ..tiny import CORPUS, fold_case, save_tiny_t5
from ..train import (
    DiTTrainConfig,
    DiTTrainer,
    LatentData,
    TextTrainConfig,
    TextTrainer,
    VAETrainConfig,
    VAETrainer,
    encode_latent_data,
    inflate_time,
    latent_stats,
    reconstruct,
)
from ..train.vae import edge_sharpness
from ..vae import Decoder, Encoder
from ..verify import manifest_of, write_manifest
from .evaluate import adherence, clean_scores
from .world import (
    COLOURS,
    MOVES,
    SHAPES,
    WorldConfig,
    caption,
    combos,
    noisy_caption,
    sample_batch,
    to_frames,
    to_model_range,
)

MODEL = CONFIGS["demo"]  # the networks' sizes; DemoSpec holds the clips and training sizes


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo model and its clips, chosen so that everything trains in under an hour on 2 CPU cores."""

    frames: int = 25  # 5 latent frames
    size: int = 64  # 64x64 pixels -> an 8x8 latent, 16 visual tokens per latent frame with patch 2 (80 in all)
    # The VAE first learns on clips of this size (8x cheaper a step than 64x64x25), then is fine-tuned at the full
    # size: it is convolutional, so what it learnt carries over (colours of 64x64 reconstructions: 89% before
    # fine-tuning, 100% after 200 steps).
    vae_pretrain_frames: int = 13
    vae_pretrain_size: int = 32
    # The second stage's clips (0: the model's own). Smaller clips are cheaper steps for the temporal compression; a
    # first stage on single frames hands its decoder over with every sub-frame made from the last (`inflate_time`).
    vae_finetune_frames: int = 0
    vae_finetune_size: int = 0
    t5_vocab: int = 400  # BPE pieces: every caption word whole, plus pieces for other English
    latent_clips: int = 4096  # clips in the DiT's training cache
    num_steps: int = 24  # sampling defaults written to mochi_defaults.json
    cfg_scale: float = 4.5
    object_size: tuple[float, float] = WorldConfig.size_range  # half-extent (circle radius) / frame size
    vae_channels: tuple[int, ...] = MODEL.encoder.channels  # the VAE's widths and ResBlocks per level (both halves)
    vae_blocks: tuple[int, ...] = MODEL.encoder.num_res_blocks
    # The first stage's objects: the same share of its smaller frames (False), or as many pixels across as in the
    # model's clips (True), the scale the VAE has to draw them at in the end.
    pretrain_keeps_pixels: bool = False
    caption_noise: float = 0.0  # share of training captions with filler words or in capitals (world.noisy_caption)

    def world(self) -> WorldConfig:
        return WorldConfig(frames=self.frames, height=self.size, width=self.size, size_range=self.object_size)

    def pretrain_world(self) -> WorldConfig:
        """The VAE's first-stage clips (never larger than the model's own)."""
        return self._vae_world(self.vae_pretrain_size, self.vae_pretrain_frames)

    def finetune_world(self) -> WorldConfig:
        """The VAE's second-stage clips (the model's own unless `vae_finetune_size` / `_frames` say smaller). This
        stage learns the motion: its objects move as many pixels a frame as in the model's clips (shorter or
        smaller clips at the same travel share would move them up to several times faster)."""
        world = self._vae_world(self.vae_finetune_size or self.size, self.vae_finetune_frames or self.frames)
        model = self.world()
        if world == model:
            return world
        # How far the average object can travel in a clip of `w` (its half-extent is a share of the frame's side).
        room = lambda w: w.width - 2 * (sum(w.size_range) / 2 * w.width + w.margin)
        faster = room(model) / (model.frames - 1) / (room(world) / (world.frames - 1))  # model / stage pixels a frame
        return replace(world, travel_range=tuple(min(1.0, t * faster) for t in model.travel_range))

    def _vae_world(self, size: int, frames: int) -> WorldConfig:
        size, frames = min(self.size, size), min(self.frames, frames)
        scale = self.size / size if self.pretrain_keeps_pixels else 1.0
        objects = tuple(r * scale for r in self.object_size)
        return WorldConfig(frames=frames, height=size, width=size, size_range=objects)


CACHE_SEED = 2  # the seed of the DiT's clip cache (the VAE trains on its own stream)


def log(msg: str) -> None:
    """Timestamped progress line (the trainers' tqdm bars show the per-step loss)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def caption_corpus(n: int = 3000, seed: int = 7) -> str:
    """Training-phrasing captions plus the generic tiny corpus: what the demo's tokenizer is trained on."""
    rng = np.random.default_rng(seed)
    pool = combos("train", MOVES + ("still",))
    lines = [caption(rng, pool[rng.integers(len(pool))], "train") for _ in range(n)]
    words = sorted({w.strip(".,").lower() for line in lines for w in line.split()})
    lines.append(" ".join(w.capitalize() for w in words))  # any word may open a prompt
    return "\n".join(lines) + "\n" + CORPUS


def build_t5(folder: Path, spec: DemoSpec, tokenizer: str = "generic", seed: int = 0) -> None:
    """A random T5 encoder and its tokenizer: the starting point of the text encoder (or all of it, when frozen).

    tokenizer "generic": the package's tiny English tokenizer, which cuts the world's words apart ("left" is
    "▁ le ft", sharing "ft" with "drifts"; "bright" is "b right", sharing "right" with a direction); "captions":
    trained on the world's captions (as T5's was on its corpus), so each of their words is one piece.
    """
    if (folder / "model.safetensors").is_file():
        return
    t5 = MODEL.t5
    size = dict(d_model=t5.d_model, num_layers=t5.num_layers, num_heads=t5.num_heads, d_ff=t5.d_ff, seed=seed)
    if tokenizer == "generic":
        save_tiny_t5(folder, **size)
    else:  # BPE pieces keep the frequent words whole; unigram training on this corpus split them
        save_tiny_t5(folder, **size, vocab_size=spec.t5_vocab, corpus=caption_corpus(), model_type="bpe")


def caption_labels(
    rng: np.random.Generator,
    n: int,
    split: str = "train",
    phrasing: str = "train",
    capitalise: float = 0.15,
    noise: float = 0.0,
) -> tuple[list[str], torch.Tensor]:
    """n captions of a split's combinations and sentence forms with their (colour, shape, direction) labels (n, 3).

    Each word is capitalised with probability `capitalise`: the tokenizer is case-sensitive and training captions
    only ever open with an article or "there", so without it "Downward, a red box glides" reads as a new word.
    `noise`: the share of captions given filler words or capitals (`world.noisy_caption`).
    """
    pool = combos(split)
    attrs = [pool[i] for i in rng.integers(len(pool), size=n)]
    captions = [caption(rng, a, phrasing) for a in attrs]
    captions = [" ".join(w.capitalize() if rng.random() < capitalise else w for w in c.split(" ")) for c in captions]
    captions = [noisy_caption(rng, c, noise) for c in captions]
    labels = [(list(COLOURS).index(a.colour), SHAPES.index(a.shape), MOVES.index(a.direction)) for a in attrs]
    return captions, torch.tensor(labels)


def pretrain_t5(
    t5_init: Path, folder: Path, work: Path, cfg: TextTrainConfig, check: bool = True, noise: float = 0.0
) -> None:
    """Teach the random T5 in `t5_init` to name the attributes of training captions (`noise`: their share with
    filler words or capitals); write it to `folder`."""
    if (folder / "model.safetensors").is_file():
        return
    text = TextEncoder.from_folder(t5_init)
    labels = partial(caption_labels, noise=noise)
    trainer = TextTrainer(text, (len(COLOURS), len(SHAPES), len(MOVES)), labels, cfg)
    trainer.fit(checkpoint=work / "t5_train")
    if check:  # a check, not a selection: held-out combinations in held-out sentence forms, never trained on
        heldout = caption_labels(np.random.default_rng(1), 512, "heldout", "heldout", capitalise=0.0)
        accuracy = dict(zip(("colour", "shape", "direction"), trainer.accuracy(*heldout)))
        log(f"text encoder on held-out captions: {accuracy}")
        (work / "t5_check.json").write_text(json.dumps(accuracy))
    with atomic_dir(folder) as tmp:  # complete or absent: a rerun after an interruption starts this stage again
        shutil.copytree(t5_init, tmp, dirs_exist_ok=True)  # the tokenizer files; the weights are replaced next
        trainer.ema_model().t5.save_pretrained(tmp)


def seeded(make, seed: int):
    """`make()` with torch's global RNG seeded, leaving the caller's stream alone: module constructors draw from it,
    and what ran before (stages done in this process or skipped on a resume) must not change a new model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def vae_models(spec: DemoSpec, seed: int = 0) -> tuple[Encoder, Decoder]:
    """A reduced AsymmVAE (the registry's "demo" entry, at `spec`'s widths): the published layout, fewer channels."""
    size = dict(channels=spec.vae_channels, num_res_blocks=spec.vae_blocks)
    return seeded(lambda: (Encoder(replace(MODEL.encoder, **size)), Decoder(replace(MODEL.decoder, **size))), seed)


def reconstruction_scores(recon: torch.Tensor, videos: torch.Tensor, attrs: list) -> dict:
    """Reconstructions (B, 3, T, H, W) in [-1, 1] of uint8 `videos` as the evaluator sees them (colour, shape,
    direction; `clean_scores`: one object, ghost-free, edge width in pixels), their PSNR and edge sharpness (1: as
    crisp as the rendered clips)."""
    frames = [to_frames(v) for v in recon]
    scores = {k: v for k, v in adherence(frames, attrs).items() if k != "observations"}
    truth = to_model_range(videos)
    scores |= clean_scores(frames)
    scores["psnr"] = float(10 * torch.log10(4.0 / (recon - truth).pow(2).mean()))  # the signal spans [-1, 1]
    return scores | {"edge": edge_sharpness(recon, truth)}


@torch.no_grad()
def vae_check(encoder, decoder, spec: DemoSpec, n: int = 140, seed: int = 123) -> dict:
    """The VAE's own reconstructions of held-out clips (all combinations, their own seed): the ceiling of what the
    DiT can reach."""
    videos, _, attrs = sample_batch(np.random.default_rng(seed), n, split="all", config=spec.world())
    recon = torch.cat([reconstruct(encoder, decoder, videos[i : i + 20]) for i in range(0, n, 20)])
    return reconstruction_scores(recon, videos, attrs)


def train_vae(work: Path, spec: DemoSpec, cfg: VAETrainConfig, finetune: VAETrainConfig) -> tuple[Encoder, Decoder]:
    """Train (or resume) the VAE on small clips (`cfg`), then on the second stage's (`finetune`, at full size by
    default); return its EMA weights."""
    encoder, decoder = vae_models(spec, cfg.seed)
    stages = [(spec.pretrain_world(), cfg, work / "vae")]
    if spec.pretrain_world() != spec.finetune_world() and finetune.steps > 0:
        stages.append((spec.finetune_world(), finetune, work / "vae_full"))
    before = None
    for world, stage_cfg, checkpoint in stages:  # each stage starts from the previous one's EMA weights
        if before is not None and before.frames == 1 < world.frames:
            inflate_time(decoder)  # the sub-frames a single-frame stage never trained start as the one it did
        before = world
        sample = lambda rng, n, world=world: sample_batch(rng, n, config=world)[0]
        trainer = VAETrainer(encoder, decoder, sample, stage_cfg)
        trainer.fit(checkpoint=checkpoint)
        ema = trainer.ema_model()
        encoder, decoder = ema["encoder"], ema["decoder"]
    return encoder, decoder


def polish_decoder(
    work: Path, spec: DemoSpec, encoder: Encoder, decoder: Decoder, cfg: VAETrainConfig, dtype: torch.dtype
) -> Decoder:
    """Fine-tune (or resume) the decoder with the encoder frozen and noise on its latents (`cfg.latent_noise`), on
    clips of the model's size and the second VAE stage's length; return its EMA weights. Both halves start as
    exported (rounded to `dtype`): what this stage makes of a build's files it makes of a shipped folder's."""
    encoder, decoder = as_exported(encoder, dtype), as_exported(decoder, dtype).requires_grad_(True)
    world = replace(spec, vae_finetune_size=0).finetune_world()
    trainer = VAETrainer(encoder, decoder, lambda rng, n: sample_batch(rng, n, config=world)[0], cfg)
    trainer.fit(checkpoint=work / "decoder_polish")
    return trainer.ema_model()["decoder"]


def as_exported(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` whose weights are rounded to `dtype` (and kept in their own dtype), as its file holds them."""
    rounded = copy.deepcopy(module)
    rounded.load_state_dict({k: v.to(dtype) for k, v in module.state_dict().items()})  # copied back into fp32
    return rounded


def clip_batches(spec: DemoSpec, n: int, seed: int, batch: int = 64, with_attributes: bool = False):
    """Training clips with captions (and attributes), in batches, from their own seed (independent of the VAE's)."""
    rng = np.random.default_rng(seed)
    for i in range(0, n, batch):
        videos, captions, attrs = sample_batch(rng, min(batch, n - i), config=spec.world())
        captions = [noisy_caption(rng, c, spec.caption_noise) for c in captions]
        yield (videos, captions, attrs) if with_attributes else (videos, captions)


def recaptioner(spec: DemoSpec, data: LatentData, seed: int):
    """Fresh training-phrasing captions for cached clips: their attributes are replayed from the cache's seed."""
    attrs = [a for _, _, batch in clip_batches(spec, len(data), seed, with_attributes=True) for a in batch]
    for a, text in zip(attrs, data.captions or []):  # the replay must give the cached clips
        if a.colour not in text.lower():
            raise ValueError(f"latent cache does not match its seed: {text!r} is not {a}; delete the cache")
    return lambda indices, rng: [
        noisy_caption(rng, caption(rng, attrs[i], "train"), spec.caption_noise) for i in indices
    ]


def dit_model(spec: DemoSpec, seed: int = 0) -> AsymmDiT:
    # init_weights gives the learned RoPE frequencies a spread of values: left at zero (the module's placeholder)
    # tokens carry no position, and the model never learns where the object is or where it goes.
    return init_weights(AsymmDiT(MODEL.dit), generator=torch.Generator().manual_seed(seed))


def export(out: Path, dit: AsymmDiT, t5, t5_files: Path, encoder, decoder, mean, std, spec, dtype) -> None:
    """Write the native layout; `dtype` halves the DiT and VAE files (the loaders cast back on load); T5 stays fp32.
    `t5_files`: the text encoder's folder (tokenizer and weights), `t5`: weights trained with the DiT, if any."""
    half = lambda module: {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    # Every file (and the t5/ folder) appears whole or not at all: an interrupted export is simply run again.
    with atomic_dir(out / "t5", replace=True) as tmp:
        for f in t5_files.iterdir():  # the tokenizer files (and the weights, replaced below when trained along)
            shutil.copyfile(f, tmp / f.name)
        if t5 is not None:
            t5.save_pretrained(tmp)
        fold_case(tmp)  # prompts in capitals read as in lower case (the captions are mostly lower case)
    (out / "dit.safetensors").unlink(missing_ok=True)  # save_dit_native refuses to overwrite
    save_dit_native(out / "dit.safetensors", dit, dtype=dtype)
    for name, module in [("decoder", decoder), ("encoder", encoder)]:
        write_atomic(out / f"{name}.safetensors", lambda f, m=module: save_file(half(m), str(f)), replace=True)
    stats = {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
    defaults = dict(
        width=spec.size, height=spec.size, num_frames=spec.frames, num_steps=spec.num_steps, cfg_scale=spec.cfg_scale
    )
    for name, value in [("latent_stats.json", stats), ("mochi_defaults.json", defaults)]:
        write_atomic(out / name, lambda f, v=value: f.write_text(json.dumps(v, indent=1) + "\n"), replace=True)
    write_manifest(out, manifest_of(out))  # what `python -m mochi_preview.verify` checks the folder against


def vae_configs(args: argparse.Namespace) -> tuple[VAETrainConfig, VAETrainConfig, VAETrainConfig]:
    """The VAE's first and second stages' settings, and the decoder's on noisy latents (`--decoder_steps`)."""
    first = VAETrainConfig(
        steps=args.vae_steps,
        batch_size=args.vae_batch,
        lr=1e-3,
        warmup=50,
        min_lr_ratio=0.05,
        object_weight=8.0,
        colour_weight=5.0,
        edge_weight=args.vae_edge_weight,
        ema_decay=0.995,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every or 100,
        seed=args.seed,
    )
    second = replace(first, steps=args.vae_finetune_steps, lr=5e-4, warmup=20, ema_decay=0.99)
    noisy = replace(second, steps=args.decoder_steps, lr=2e-4, train_encoder=False, latent_noise=args.decoder_noise)
    return first, second, noisy


def spec_of(args: argparse.Namespace) -> DemoSpec:
    """The demo's sizes as the command line gives them."""
    return DemoSpec(
        frames=args.frames,
        size=args.size,
        vae_pretrain_frames=args.vae_pretrain_frames,
        vae_pretrain_size=args.vae_pretrain_size,
        vae_finetune_frames=args.vae_finetune_frames,
        vae_finetune_size=args.vae_finetune_size,
        latent_clips=args.latent_clips,
        object_size=tuple(args.object_size),
        vae_channels=tuple(args.vae_channels),
        vae_blocks=tuple(args.vae_blocks),
        pretrain_keeps_pixels=args.vae_pretrain_pixels,
        caption_noise=args.caption_noise,
    )


def arguments() -> argparse.ArgumentParser:
    """The build's command line (its checks of the values are in `main`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write (native layout)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and caches (default: OUT/../OUT.work)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--vae_finetune_steps", type=int, default=200, help="second-stage VAE steps, after --vae_steps")
    p.add_argument("--text_steps", type=int, default=600, help="text-encoder pretraining steps")
    p.add_argument("--dit_steps", type=int, default=2000)
    p.add_argument("--decoder_steps", type=int, default=0,
                   help="steps of the decoder alone on noisy latents, after the DiT (0: none)")  # fmt: skip
    p.add_argument("--decoder_noise", type=float, default=0.5,
                   help="--decoder_steps: the largest noise on its latents, in latent standard deviations")  # fmt: skip
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--size", type=int, default=DemoSpec.size, help="clip width and height (a multiple of 16)")
    p.add_argument("--frames", type=int, default=DemoSpec.frames, help="clip length (6k + 1)")
    p.add_argument("--vae_pretrain_size", type=int, default=DemoSpec.vae_pretrain_size)
    p.add_argument("--vae_pretrain_frames", type=int, default=DemoSpec.vae_pretrain_frames)
    p.add_argument("--vae_finetune_size", type=int, default=0, help="second-stage clip size (0: --size)")
    p.add_argument("--vae_finetune_frames", type=int, default=0, help="second-stage clip length (0: --frames)")
    p.add_argument("--latent_clips", type=int, default=DemoSpec.latent_clips, help="clips in the DiT's cache")
    p.add_argument(
        "--object_size", type=float, nargs=2, default=DemoSpec.object_size, help="half-extent range / frame size"
    )
    p.add_argument("--vae_channels", type=int, nargs=4, default=DemoSpec.vae_channels, help="VAE widths per level")
    p.add_argument("--vae_blocks", type=int, nargs=5, default=DemoSpec.vae_blocks, help="VAE ResBlocks per level")
    p.add_argument("--vae_edge_weight", type=float, default=0.0, help="VAE loss: L1 of the spatial gradients")
    p.add_argument(
        "--vae_pretrain_pixels",
        action="store_true",
        help="first-stage objects as many pixels across as in the model's clips (default: the same share of the frame)",
    )
    p.add_argument(
        "--text_encoder",
        choices=["pretrained", "frozen", "trained"],
        default="pretrained",
        help="T5 taught the captions' attributes, then frozen (default); the random T5 frozen; or trained with the DiT",
    )
    p.add_argument(
        "--captions",
        choices=["cached", "fresh"],
        default="cached",
        help="the cache's caption per clip (default) or a new one at every step",
    )
    p.add_argument(
        "--tokenizer",
        choices=["generic", "captions"],
        default="generic",
        help="the tiny generic tokenizer (default) or one trained on the captions",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and training draws of every stage")
    p.add_argument(
        "--checkpoint_every", type=int, default=0, help="steps between checkpoints (0: T5 200, VAE 100, DiT 250)"
    )
    p.add_argument("--caption_noise", type=float, default=0.0,
                   help="share of training captions with filler words or in capitals (0: none)")  # fmt: skip
    p.add_argument(
        "--skip_eval", action="store_true", help="no checks (T5 on held-out captions, VAE reconstructions, adherence)"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    p = arguments()
    args = p.parse_args(argv)
    # Checked before anything is written: a wrong size would otherwise fail stages later, inside a network.
    g = MOCHI
    if not g.valid_size(args.size):
        p.error(f"--size {args.size}: must be a multiple of {g.pixel_multiple} (8x VAE compression, then 2x2 DiT "
                f"patches); nearest valid: {g.nearest_size(args.size)}")  # fmt: skip
    for name, least in [("vae_pretrain_size", g.spatial), ("vae_finetune_size", 0)]:  # 0: the model's --size
        if (n := getattr(args, name)) % g.spatial or n < least:
            p.error(f"--{name} {n}: must be a multiple of {g.spatial} (the VAE's compression), at least {least}")
    for name in ("frames", "vae_pretrain_frames", "vae_finetune_frames"):
        n = getattr(args, name)
        if not g.valid_frames(n) and not (name == "vae_finetune_frames" and n == 0):  # 0: the model's --frames
            p.error(f"--{name} {n}: must be {g.temporal}k + 1 (the VAE's causal compression); nearest valid: "
                    f"{g.nearest_frames(n)}")  # fmt: skip
    if any(c < 32 or c % 32 for c in args.vae_channels) or min(args.vae_blocks) < 0:
        p.error(f"--vae_channels {args.vae_channels} must be positive multiples of 32 (GroupNorm with 32 groups), "
                f"--vae_blocks {args.vae_blocks} at least 0")  # fmt: skip
    small, large = args.object_size
    stage_sizes = [("vae_pretrain_size", args.vae_pretrain_size), ("vae_finetune_size", args.vae_finetune_size)]
    frames_of = [("size", args.size)] + [(name, min(args.size, n)) for name, n in stage_sizes if n]
    for name, frame in frames_of:
        unit = args.size if args.vae_pretrain_pixels else frame  # object sizes are shares of this many pixels
        limit = (frame / 2 - WorldConfig.margin) / unit  # the largest half-extent that leaves room to move
        if not 0 < small <= large < limit:
            p.error(f"--object_size {small} {large}: needs 0 < MIN <= MAX < {limit:.3f} (objects that fit with "
                    f"room to move in the {frame}-pixel frames of --{name})")  # fmt: skip
    counts = ("text_steps", "vae_steps", "vae_finetune_steps", "dit_steps", "decoder_steps", "latent_clips",
              "vae_batch", "threads")  # fmt: skip
    for name in (*counts, "seed", "checkpoint_every"):
        at_least_0 = name.endswith("steps") or name in ("seed", "checkpoint_every")
        if getattr(args, name) < (0 if at_least_0 else 1):
            p.error(f"--{name} {getattr(args, name)}: must be {'at least 0' if at_least_0 else 'positive'}")
    if not 0.0 <= args.caption_noise <= 1.0:
        p.error(f"--caption_noise {args.caption_noise}: must be between 0 and 1")
    if not 0.0 <= args.decoder_noise <= 4.0:
        p.error(f"--decoder_noise {args.decoder_noise}: must be between 0 and 4 (latent standard deviations)")
    torch.set_num_threads(args.threads)
    spec = spec_of(args)
    out, work = args.out, args.work or args.out.with_name(args.out.name + ".work")
    # The latent cache holds one text encoder's features, the checkpoints one seed's run: a work folder stays with
    # the options it began with (folders from before --seed / --caption_noise: seed 0, no noise).
    text_options = {"text_encoder": args.text_encoder, "tokenizer": args.tokenizer, "seed": args.seed,
                    "caption_noise": args.caption_noise}  # fmt: skip
    record = work / "text_options.json"
    before = {"seed": 0, "caption_noise": 0.0, **json.loads(record.read_text())} if record.is_file() else text_options
    if before != text_options:
        p.error(f"{work} was built with {before}, not {text_options}: give another --work or the same options")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(asdict(spec)))
    record.write_text(json.dumps(text_options))
    start = time.time()

    log("1/6 text encoder")
    t5_init = work / "t5_init"
    every = lambda default: args.checkpoint_every or default
    build_t5(t5_init, spec, args.tokenizer, args.seed)
    t5_files = t5_init
    if args.text_encoder == "pretrained":
        t5_files = work / "t5"
        text_cfg = TextTrainConfig(
            steps=args.text_steps, threads=args.threads, checkpoint_every=every(200), seed=args.seed
        )
        pretrain_t5(t5_init, t5_files, work, text_cfg, check=not args.skip_eval, noise=args.caption_noise)
    text = TextEncoder.from_folder(t5_files)

    log("2/6 VAE")
    vae_cfg, finetune_cfg, noisy_cfg = vae_configs(args)
    encoder, decoder = train_vae(work, spec, vae_cfg, finetune_cfg)
    if not args.skip_eval:
        check = vae_check(encoder, decoder, spec)
        log(f"VAE reconstructions: {check}")
        (work / "vae_check.json").write_text(json.dumps(check))

    log("3/6 latent statistics and cache")
    cache = work / "latents.safetensors"
    stats_file = work / "latent_stats.json"
    if not cache.is_file():
        stats_clips = min(512, spec.latent_clips)  # 512 in the real build; toy builds encode fewer
        mean, std = latent_stats(encoder, (v for v, _ in clip_batches(spec, stats_clips, seed=1)))
        stats = json.dumps({"mean": mean.tolist(), "std": std.tolist()})
        write_atomic(stats_file, lambda f: f.write_text(stats), replace=True)
        data = encode_latent_data(encoder, text, clip_batches(spec, spec.latent_clips, seed=CACHE_SEED), mean, std)
        write_atomic(cache, data.save)  # the cache's presence marks this stage done: never a half-written one
    stats = json.loads(stats_file.read_text())
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    data = LatentData.load(cache)
    log(f"latent std per channel (VAE space): {[round(x, 2) for x in stats['std']]}")

    log("4/6 DiT")
    trained = args.text_encoder == "trained"
    dit_cfg = DiTTrainConfig(
        steps=args.dit_steps,
        lr=6e-4,
        warmup=100,
        threads=args.threads,
        checkpoint_every=every(250),
        train_text_encoder=trained,
        seed=args.seed,
    )
    fresh = args.captions == "fresh"
    runs_t5 = trained or fresh  # T5 runs at every step on token ids instead of giving the cached features
    recaption = recaptioner(spec, data, seed=CACHE_SEED) if fresh else None
    trainer = DiTTrainer(dit_model(spec, args.seed), data, dit_cfg, text=text if runs_t5 else None, recaption=recaption)
    trainer.fit(checkpoint=work / "dit")
    ema = trainer.ema_model()
    dit = ema.dit if runs_t5 else ema
    t5 = ema.t5 if trained else None

    dtype = getattr(torch, args.dtype)
    if args.decoder_steps:
        log("5/6 decoder on noisy latents")
        decoder = polish_decoder(work, spec, encoder, decoder, noisy_cfg, dtype)
        if not args.skip_eval:
            check = vae_check(encoder, decoder, spec)
            log(f"VAE reconstructions (polished decoder): {check}")
            (work / "decoder_check.json").write_text(json.dumps(check))

    log("6/6 export and evaluation")
    export(out, dit, t5, t5_files, encoder, decoder, mean, std, spec, dtype)
    log(f"built {out} in {(time.time() - start) / 60:.1f} min (this run; resumed stages count only their new part)")
    if not args.skip_eval:
        from .evaluate_model import main as evaluate

        evaluate(["--model_dir", str(out), "--threads", str(args.threads)])


if __name__ == "__main__":
    main()
