"""How well the demo's text encoder reads held-out captions, for each way of preparing it (the build's stage 1).

`python bench/bench_text_encoder.py [--steps 600]` starts from the build's random T5 (2 layers, width 128, generic
tiny tokenizer), trains one linear head per attribute on its mean feature (and, except for the first row, the T5
itself) on training captions, and prints, on captions of the held-out combinations in the held-out sentence forms,
the share whose colour, shape and direction are named right, with the direction split by the kind of phrase: only
"from A to B" needs word order, since both A and B are direction words.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mochi_preview.demo.build import DemoSpec, build_t5, caption_labels
from mochi_preview.demo.world import COLOURS, MOVES, SHAPES
from mochi_preview.text import TextEncoder
from mochi_preview.train import TextTrainConfig, TextTrainer, make_optimizer

VARIANTS = {  # name: (T5 trained, position-bias std, share of words capitalised)
    "frozen random T5 (heads only)": (False, None, 0.15),
    "T5 trained, its own position-bias init": (True, None, 0.15),
    "T5 trained, position bias redrawn at std 1.5, no capitalisation": (True, 1.5, 0.0),
    "T5 trained, position bias redrawn at std 1.5 (the build)": (True, 1.5, 0.15),
}


def phrase_kind(caption: str) -> str:
    """Which kind of direction phrase a caption uses."""
    text = caption.lower()
    if " from " in f" {text}":
        return "from A to B"
    if "ward" in text:
        return "-ward"
    if "the left" in text or "the right" in text or "the top" in text or "the bottom" in text:
        return "to/towards the X"
    return "up/down"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    captions, labels = caption_labels(np.random.default_rng(1), 1000, "heldout", "heldout", capitalise=0.0)
    kinds = np.array([phrase_kind(c) for c in captions])
    columns = ["from A to B", "-ward", "to/towards the X", "up/down"]
    print(f"| text encoder ({args.steps} steps) | colour | shape | direction | " + " | ".join(columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        build_t5(Path(tmp) / "t5", DemoSpec())
        for name, (train_t5, bias_std, capitalise) in VARIANTS.items():
            start = time.time()
            text = TextEncoder.from_folder(Path(tmp) / "t5")
            sample = lambda rng, n, c=capitalise: caption_labels(rng, n, capitalise=c)
            cfg = TextTrainConfig(steps=args.steps, position_bias_std=bias_std, threads=args.threads)
            trainer = TextTrainer(text, (len(COLOURS), len(SHAPES), len(MOVES)), sample, cfg)
            if not train_t5:
                trainer.model.t5.requires_grad_(False)
                trainer.optimizer = make_optimizer(trainer.model, cfg)  # the heads alone
            trainer.fit(progress=False)
            with torch.no_grad():
                logits = trainer.logits(trainer.ema_model(), captions)
            right = [(x.argmax(-1) == labels[:, k]).numpy() for k, x in enumerate(logits)]
            by_kind = [f"{right[2][kinds == kind].mean():.1%}" for kind in columns]
            overall = [f"{r.mean():.1%}" for r in right]
            print(f"| {name} | " + " | ".join(overall + by_kind) + f" |  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
