"""What makes the demo VAE keep each object's colour and shape: one short training run per call, then its scores.

`python bench/bench_demo_vae.py --name NAME [--size 64 --frames 7 --object 0.08 0.14 --channels 32 32 64 64 ...]`
trains a VAE of the demo's layout on the demo world's clips (1 thread by default; resumable: checkpoints under
`--work/NAME`), then reconstructs held-out clips (all colour x shape x direction combinations, their own seed) and
reports what the evaluator sees in them (colour, shape, direction, one object, ghosts), PSNR and the edge sharpness
(gradient on the rendered outlines, reconstruction / truth): the build's `reconstruction_scores`. One JSON line per
run is appended to `--log`. `--init DIR` starts from another run's EMA weights (a fine-tuning stage; `--inflate`: a
single-frame run's decoder with every sub-frame of its temporal expansions made from the last, `train.inflate_time`),
`--travel` the training clips' travel (share of the room to move), `--eval_only` scores the shipped VAE (`--init
assets`) or a finished run without training, `--blur S` the rendered clips blurred by a Gaussian of S pixels instead
(how crisp the evaluator needs outlines to be).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from mochi_preview.demo.build import DemoSpec, reconstruction_scores, vae_models
from mochi_preview.demo.world import WorldConfig, sample_batch
from mochi_preview.tiny import default_model_dir
from mochi_preview.train import VAETrainConfig, VAETrainer, inflate_time, reconstruct
from mochi_preview.vae import Decoder, Encoder


def load_weights(encoder: Encoder, decoder: Decoder, source: Path) -> None:
    """The EMA weights of a bench/build checkpoint folder, or a model folder's encoder/decoder.safetensors."""
    if (source / "state.safetensors").is_file():
        state = load_file(source / "state.safetensors")
        for name, module in [("encoder", encoder), ("decoder", decoder)]:
            prefix = f"ema.{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    else:
        encoder.load_state_dict({k: v.float() for k, v in load_file(source / "encoder.safetensors").items()})
        decoder.load_state_dict({k: v.float() for k, v in load_file(source / "decoder.safetensors").items()})


def blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 (B, 3, T, H, W) -> each frame blurred by a Gaussian of `sigma` pixels, float in [-1, 1]."""
    x = videos.float() / 127.5 - 1.0
    radius = max(1, round(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    b, c, t, h, w = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    x = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def scores(recon_fn, world: WorldConfig, n: int, seed: int, batch: int = 8) -> dict:
    """The build's reconstruction scores of `recon_fn(uint8 clips) -> [-1, 1]` on `n` held-out clips."""
    videos, _, attrs = sample_batch(np.random.default_rng(seed), n, split="all", config=world)
    recon = torch.cat([recon_fn(videos[i : i + batch]) for i in range(0, n, batch)])
    return reconstruction_scores(recon, videos, attrs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="the run's name (its checkpoint folder and log entry)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_demo_vae"))
    p.add_argument("--log", type=Path, default=Path("/tmp/bench_demo_vae.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="training clips' width and height")
    p.add_argument("--frames", type=int, default=7)
    p.add_argument("--object", type=float, nargs=2, default=(0.08, 0.14), help="half-extent range / frame size")
    p.add_argument("--travel", type=float, nargs=2, default=WorldConfig.travel_range, help="training clips' travel")
    p.add_argument("--eval_size", type=int, default=None, help="default: --size (objects keep their pixel size)")
    p.add_argument("--eval_frames", type=int, default=None, help="default: --frames")
    p.add_argument("--eval_n", type=int, default=96)
    p.add_argument("--eval_seed", type=int, default=12345)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 32, 64, 64])
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 0, 1, 1, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--object_weight", type=float, default=8.0)
    p.add_argument("--colour_weight", type=float, default=5.0)
    p.add_argument("--edge_weight", type=float, default=0.0)
    p.add_argument("--recon_loss", choices=["l1", "mse"], default="l1")
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--init", type=str, default=None, help="a run's checkpoint folder, a model folder or 'assets'")
    p.add_argument("--inflate", action="store_true", help="after --init: every decoder sub-frame from the last one")
    p.add_argument("--background_bias", action="store_true", help="start the decoder's output at the background")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--blur", type=float, default=None, help="score Gaussian-blurred clips (sigma px), not a VAE")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pixels = args.size  # object sizes are fractions of the training frame; evaluation keeps them in pixels
    world = WorldConfig(
        args.frames, args.size, args.size, size_range=tuple(args.object), travel_range=tuple(args.travel)
    )
    eval_size = args.eval_size or args.size
    eval_world = WorldConfig(
        frames=args.eval_frames or args.frames,
        height=eval_size,
        width=eval_size,
        size_range=tuple(r * pixels / eval_size for r in args.object),
    )
    encoder, decoder = vae_models(DemoSpec(vae_channels=tuple(args.channels), vae_blocks=tuple(args.blocks)))
    if args.background_bias:  # Adam moves a bias about lr a step: from 0 to the background's -0.87 takes ~900 steps
        with torch.no_grad():
            decoder.output_proj.bias.copy_(torch.tensor(world.background) / 127.5 - 1.0)
    if args.init:
        load_weights(encoder, decoder, default_model_dir() if args.init == "assets" else Path(args.init))
    if args.inflate:
        inflate_time(decoder)
    cfg = VAETrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        warmup=args.warmup,
        min_lr_ratio=0.05,
        object_weight=args.object_weight,
        colour_weight=args.colour_weight,
        edge_weight=args.edge_weight,
        recon_loss=args.recon_loss,
        ema_decay=args.ema_decay,
        threads=args.threads,
        checkpoint_every=50,
    )
    start, cpu_start, seconds_per_step, final = time.time(), time.process_time(), None, {}
    if not args.eval_only:
        trainer = VAETrainer(encoder, decoder, lambda rng, n: sample_batch(rng, n, config=world)[0], cfg)
        first = trainer.step if (args.work / args.name / "state.json").exists() else 0
        trainer.fit(checkpoint=args.work / args.name, progress=False)
        seconds_per_step = (time.process_time() - cpu_start) / max(1, trainer.step - first)
        final = {k: float(np.mean([h[k] for h in trainer.history[-20:]])) for k in ("loss", "psnr", "edge")}
        ema = trainer.ema_model()
        encoder, decoder = ema["encoder"], ema["decoder"]
    train_s, train_cpu_s = time.time() - start, time.process_time() - cpu_start
    encoder.eval(), decoder.eval()
    recon_fn = lambda v: reconstruct(encoder, decoder, v)
    if args.blur is not None:
        recon_fn = lambda v: blur(v, args.blur)
    result = {
        "name": args.name,
        "world": asdict(world),
        "eval_world": asdict(eval_world),
        "channels": args.channels,
        "blocks": args.blocks,
        "params": sum(p.numel() for p in [*encoder.parameters(), *decoder.parameters()]),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("betas", "checkpoint_every")},
        "init": args.init,
        "inflate": args.inflate,
        "blur": args.blur,
        "background_bias": args.background_bias,
        "train_s": round(train_s, 1),  # wall time, inflated by other jobs on the machine
        "train_cpu_s": round(train_cpu_s, 1),  # CPU time of this process (1 thread): its cost on an idle core
        "cpu_s_per_step": seconds_per_step and round(seconds_per_step, 3),
        "final_train": final,
        **scores(recon_fn, eval_world, args.eval_n, args.eval_seed),
        "eval_s": round(time.time() - start - train_s, 1),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(result))
    with open(args.log, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
