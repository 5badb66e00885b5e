"""Build the demo model from scratch: `python -m mochi_preview.demo.build --out DIR [--threads 2]`.

Stages, each resumable (trainers checkpoint under `--work`; finished stages are skipped):
1. a frozen tiny T5 (random T5 v1.1 architecture) and its sentencepiece tokenizer, written to `OUT/t5/`;
2. the VAE (reconstruction + object colour + KL), then a colour check of its reconstructions with the evaluator;
3. the latent statistics (per-channel mean/std, the demo's normalization constants) and a cache of encoded clips;
4. the DiT, trained with flow matching on that cache;
5. export in the published native layout (dit/decoder/encoder.safetensors, t5/) plus `mochi_defaults.json` and
   `latent_stats.json`, then the adherence evaluation (`evaluate_model`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..dit import AsymmDiT, DiTConfig, init_weights, save_dit_native
from ..text import TextEncoder
from ..tiny import save_tiny_t5
from ..train import (
    DiTTrainConfig,
    DiTTrainer,
    LatentData,
    VAETrainConfig,
    VAETrainer,
    encode_latent_data,
    latent_stats,
    reconstruct,
)
from ..vae import Decoder, DecoderConfig, Encoder, EncoderConfig
from .evaluate import adherence
from .world import WorldConfig, sample_batch, to_frames


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo model and its clips, chosen so that everything trains in under an hour on 2 CPU cores."""

    frames: int = 13  # 3 latent frames
    size: int = 32  # 32x32 pixels -> a 4x4 latent, 12 visual tokens with patch 2
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_blocks: tuple[int, ...] = (0, 0, 1, 1, 1)
    t5_dim: int = 128
    dit_depth: int = 4
    dit_heads: int = 3  # 3.9M parameters: 7.8 MB in fp16, inside the 16 MB budget with the VAE and T5
    dit_head_dim: int = 64
    dit_dim_y: int = 128
    latent_clips: int = 2048  # clips in the DiT's training cache
    num_steps: int = 24  # sampling defaults written to mochi_defaults.json
    cfg_scale: float = 4.5

    def world(self) -> WorldConfig:
        return WorldConfig(frames=self.frames, height=self.size, width=self.size)


def log(msg: str) -> None:
    """Timestamped progress line (the trainers' tqdm bars show the per-step loss)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_t5(out: Path, spec: DemoSpec) -> None:
    """A random, frozen T5 encoder: its features differ per word, which is all the DiT needs to be steered."""
    if not (out / "t5" / "model.safetensors").is_file():
        save_tiny_t5(out / "t5", d_model=spec.t5_dim, num_layers=2, num_heads=4, d_ff=2 * spec.t5_dim, seed=0)


def vae_models(spec: DemoSpec) -> tuple[Encoder, Decoder]:
    """A reduced AsymmVAE: the published layout with fewer channels and blocks, no attention."""
    blocks = spec.vae_blocks
    encoder = Encoder(EncoderConfig(channels=spec.vae_channels, num_res_blocks=blocks, has_attention=(False,) * 5))
    return encoder, Decoder(DecoderConfig(channels=spec.vae_channels, num_res_blocks=blocks))


@torch.no_grad()
def vae_colour_check(encoder, decoder, spec: DemoSpec, n: int = 140, seed: int = 123) -> dict:
    """Adherence of the VAE's own reconstructions (all combinations): the ceiling of what the DiT can reach."""
    videos, _, attrs = sample_batch(np.random.default_rng(seed), n, split="all", config=spec.world())
    recon = torch.cat([reconstruct(encoder, decoder, videos[i : i + 20]) for i in range(0, n, 20)])
    scores = adherence([to_frames(v) for v in recon], attrs)
    return {k: v for k, v in scores.items() if k != "observations"}


def train_vae(work: Path, spec: DemoSpec, cfg: VAETrainConfig) -> tuple[Encoder, Decoder]:
    """Train (or resume) the VAE and return its EMA weights."""
    encoder, decoder = vae_models(spec)
    world = spec.world()
    trainer = VAETrainer(encoder, decoder, lambda rng, n: sample_batch(rng, n, config=world)[0], cfg)
    trainer.fit(checkpoint=work / "vae")
    ema = trainer.ema_model()
    return ema["encoder"], ema["decoder"]


def clip_batches(spec: DemoSpec, n: int, seed: int, batch: int = 64):
    """Training clips with captions, in batches, from their own seed (independent of the VAE's stream)."""
    rng = np.random.default_rng(seed)
    for i in range(0, n, batch):
        videos, captions, _ = sample_batch(rng, min(batch, n - i), config=spec.world())
        yield videos, captions


def dit_model(spec: DemoSpec) -> AsymmDiT:
    cfg = DiTConfig.reduced(spec.dit_depth, spec.dit_heads, spec.dit_dim_y, spec.t5_dim, head_dim=spec.dit_head_dim)
    # init_weights gives the learned RoPE frequencies a spread of values: left at zero (the module's placeholder)
    # tokens carry no position, and the model never learns where the object is or where it goes.
    return init_weights(AsymmDiT(cfg), generator=torch.Generator().manual_seed(0))


def export(out: Path, dit: AsymmDiT, encoder, decoder, mean, std, spec: DemoSpec, dtype: torch.dtype) -> None:
    """Write the native layout; `dtype` halves the files (the loaders cast back on load)."""
    half = lambda module: {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    (out / "dit.safetensors").unlink(missing_ok=True)  # save_dit_native refuses to overwrite
    save_dit_native(out / "dit.safetensors", dit, dtype=dtype)
    save_file(half(decoder), str(out / "decoder.safetensors"))
    save_file(half(encoder), str(out / "encoder.safetensors"))
    stats = {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
    (out / "latent_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    defaults = dict(
        width=spec.size, height=spec.size, num_frames=spec.frames, num_steps=spec.num_steps, cfg_scale=spec.cfg_scale
    )
    (out / "mochi_defaults.json").write_text(json.dumps(defaults, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write (native layout)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints and caches (default: OUT/../OUT.work)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch", type=int, default=8)
    p.add_argument("--dit_steps", type=int, default=2000)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--size", type=int, default=DemoSpec.size, help="clip width and height (a multiple of 8)")
    p.add_argument("--frames", type=int, default=DemoSpec.frames, help="clip length (6k + 1)")
    p.add_argument("--skip_eval", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = DemoSpec(frames=args.frames, size=args.size)
    out, work = args.out, args.work or args.out.with_name(args.out.name + ".work")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(asdict(spec)))
    start = time.time()

    log("1/5 text encoder")
    build_t5(out, spec)
    text = TextEncoder.from_folder(out / "t5")

    log("2/5 VAE")
    vae_cfg = VAETrainConfig(
        steps=args.vae_steps,
        batch_size=args.vae_batch,
        lr=1e-3,
        warmup=50,
        min_lr_ratio=0.05,
        object_weight=8.0,
        colour_weight=5.0,
        ema_decay=0.995,
        threads=args.threads,
        checkpoint_every=100,
    )
    encoder, decoder = train_vae(work, spec, vae_cfg)
    check = vae_colour_check(encoder, decoder, spec)
    log(f"VAE reconstructions: {check}")
    (work / "vae_check.json").write_text(json.dumps(check))

    log("3/5 latent statistics and cache")
    cache = work / "latents.safetensors"
    stats_file = work / "latent_stats.json"
    if not cache.is_file():
        mean, std = latent_stats(encoder, (v for v, _ in clip_batches(spec, 512, seed=1)))
        stats_file.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
        data = encode_latent_data(encoder, text, clip_batches(spec, spec.latent_clips, seed=2), mean, std)
        data.save(cache)
    stats = json.loads(stats_file.read_text())
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    data = LatentData.load(cache)
    log(f"latent std per channel (VAE space): {[round(x, 2) for x in stats['std']]}")

    log("4/5 DiT")
    dit_cfg = DiTTrainConfig(steps=args.dit_steps, lr=6e-4, warmup=100, threads=args.threads, checkpoint_every=250)
    trainer = DiTTrainer(dit_model(spec), data, dit_cfg)
    trainer.fit(checkpoint=work / "dit")

    log("5/5 export and evaluation")
    dtype = getattr(torch, args.dtype)
    export(out, trainer.ema_model(), encoder, decoder, mean, std, spec, dtype)
    log(f"built {out} in {(time.time() - start) / 60:.1f} min (this run; resumed stages count only their new part)")
    if not args.skip_eval:
        from .evaluate_model import main as evaluate

        evaluate(["--model_dir", str(out), "--threads", str(args.threads)])


if __name__ == "__main__":
    main()
