"""Which caption words a demo DiT reads: its flow-matching loss on cached training clips with words swapped.

`python bench/probe_text_reading.py --model_dir DIR --cache WORK/latents.safetensors` prints, per noise level, the
loss with the true captions, with the direction words swapped (left<->right, up<->down, top<->bottom), with the colour
words swapped, and with no text. A model that reads a kind of word loses accuracy when those words are swapped.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from mochi_preview import MochiPipeline
from mochi_preview.text import TextEncoder
from mochi_preview.train import LatentData, noisy_latents

DIRECTIONS = {"left": "right", "up": "down", "top": "bottom", "leftward": "rightward", "upward": "downward"}
COLOURS = {"red": "blue", "green": "purple", "yellow": "white"}


def swapper(pairs: dict[str, str]):
    """A function replacing each word of `pairs` (either way round) by its partner, whole words only."""
    both = pairs | {b: a for a, b in pairs.items()}
    pattern = re.compile(r"\b(" + "|".join(both) + r")\b")
    return lambda text: pattern.sub(lambda m: both[m.group(1)], text)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="the build's latents.safetensors (training clips)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.95, 0.8, 0.5])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dit = MochiPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32, device="cpu").dit
    text = TextEncoder.from_folder(args.model_dir / "t5")
    data = LatentData.load(args.cache)
    z0, captions = data.mean[: args.clips], (data.captions or [])[: args.clips]
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    variants = {
        "true": captions,
        "directions swapped": list(map(swapper(DIRECTIONS), captions)),
        "colours swapped": list(map(swapper(COLOURS), captions)),
        "no text": [""] * len(captions),
    }
    encoded = {name: text.encode(texts) for name, texts in variants.items()}
    print("sigma | " + " | ".join(variants))
    for sigma in args.sigmas:
        s = torch.full((len(z0),), sigma)
        z = noisy_latents(z0, noise, s)
        losses = [((dit(z, s, f, m) - (z0 - noise)) ** 2).mean().item() for f, m in encoded.values()]
        print(f"{sigma} | " + " | ".join(f"{x:.4f}" for x in losses))


if __name__ == "__main__":
    main()
