"""Adherence of a model to held-out prompts: `python -m mochi_preview.demo.evaluate_model [--model_dir DIR]`.

The prompts pair every held-out colour x shape x direction combination (never seen in training) with every held-out
sentence form (never seen either), 9 x 5 = 45 prompts. Each is generated through the normal `MochiPipeline` with the
model's own defaults, and the evaluator measures colour and direction from the frames alone.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from .. import settings
from ..pipeline import MochiPipeline
from .evaluate import adherence, clean_scores
from .world import FILLER_TEMPLATES, HELDOUT_COMBOS, HELDOUT_TEMPLATES, Attributes, caption

PROMPT_SETS = {"heldout": HELDOUT_TEMPLATES, "filler": FILLER_TEMPLATES}


def heldout_prompts(seed: int = 0, prompts: str = "heldout") -> list[tuple[str, Attributes]]:
    """(prompt, intended attributes) for every held-out combination in every sentence form of a prompt set: the
    held-out forms, or the held-out phrasings with filler words (`world.FILLER_TEMPLATES`)."""
    if prompts not in PROMPT_SETS:
        raise ValueError(f"prompts must be one of {sorted(PROMPT_SETS)}; got {prompts!r}")
    rng = np.random.default_rng(seed)
    return [
        (caption(rng, Attributes(*combo), prompts, template), Attributes(*combo))
        for combo in sorted(HELDOUT_COMBOS)
        for template in PROMPT_SETS[prompts]
    ]


def model_defaults(model_dir: Path) -> dict:
    """Size, frames, steps and guidance from the folder's mochi_defaults.json (a demo model's own clip size)."""
    s = settings.model_defaults(model_dir)
    keys = ("width", "height", "num_frames", "num_inference_steps", "guidance_scale")
    return {k: getattr(s, k) for k in keys}


def generate(pipe: MochiPipeline, prompts: list[str], defaults: dict, seed: int = 0) -> np.ndarray:
    """(N, T, H, W, 3) floats in [0, 1], in batches of 16 prompts, seeds seed, seed + 1, ..."""
    out = []
    for i in range(0, len(prompts), 16):
        batch = prompts[i : i + 16]
        g = torch.Generator().manual_seed(seed + i)
        out.append(np.asarray(pipe(batch, generator=g, progress=False, output_type="np", **defaults).frames))
    return np.concatenate(out)


def evaluate(model_dir: Path, seed: int = 0, prompts: str = "heldout") -> dict:
    """Generate a set's 45 held-out prompts; score colour, direction and shape, the share of clips with one object in
    at least 95% of frames and of clips free of ghosts, and the median edge width in pixels."""
    pipe = MochiPipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    cases = heldout_prompts(seed, prompts)
    start = time.time()
    videos = generate(pipe, [p for p, _ in cases], model_defaults(model_dir), seed)
    scores = adherence(list(videos), [a for _, a in cases])
    scores |= clean_scores(videos)
    return {"cases": cases, "videos": videos, "seconds": time.time() - start, **scores}


def markdown(result: dict, model_dir: Path) -> str:
    """The "## Demo model" section of bench/RESULTS.md: scores and every prompt with what was seen."""
    intro = (
        f"Model: `{model_dir}` (trained by `python -m mochi_preview.demo.build`). Command: "
        "`python -m mochi_preview.demo.evaluate_model`. Prompts: the 9 held-out colour x shape x direction "
        "combinations x the 5 held-out sentence forms; generated with the model's defaults on 2 CPU threads, "
        f"{result['n']} clips in {result['seconds']:.1f} s."
    )
    lines = [
        "## Demo model",
        "",
        textwrap.fill(intro, 120, break_on_hyphens=False),
        "",
        "| colour | direction | shape | all three | one object | ghost-free | edge width (px) |",
        "|---|---|---|---|---|---|---|",
        f"| {result['colour']:.1%} | {result['direction']:.1%} | {result['shape']:.1%} | {result['all']:.1%} "
        f"| {result['one_object']:.1%} | {result['ghost_free']:.1%} | {result['edge_width']:.2f} |",
        "",
        "| prompt | wanted (colour, shape, direction) | seen |",
        "|---|---|---|",
    ]
    for (prompt, want), seen in zip(result["cases"], result["observations"]):
        lines.append(f"| {prompt} | {want.colour}, {want.shape}, {want.direction} | "
                     f"{seen.colour}, {seen.shape}, {seen.direction} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def save_strip(videos: np.ndarray, path: Path, rows: int = 4, frames: int = 7, scale: int | None = None) -> None:
    """A PNG: `rows` clips, each as `frames` evenly spaced frames, enlarged `scale` times (nearest neighbour;
    default: to about 128 pixels a frame)."""
    from PIL import Image

    scale = scale or max(1, round(128 / videos.shape[3]))
    picks = np.linspace(0, videos.shape[1] - 1, frames).round().astype(int)
    tiles = []
    for v in videos[:rows]:
        row = [np.pad(v[t], ((1, 1), (1, 1), (0, 0)), constant_values=0.5) for t in picks]  # a grey frame border
        tiles.append(np.concatenate(row, axis=1))
    strip = (np.concatenate(tiles, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", type=Path, default=None, help="default: the demo model shipped in the package")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the prompts' wording and the generations' noise")
    p.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="heldout",
                   help="held-out sentence forms, or held-out phrasings with filler words")  # fmt: skip
    p.add_argument("--markdown", type=Path, default=None, help="append the results section to this file")
    p.add_argument("--strip", type=Path, default=None, help="write a PNG strip of frames of a few prompts")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from ..tiny import default_model_dir

        args.model_dir = default_model_dir()
    result = evaluate(args.model_dir, args.seed, args.prompts)
    print(f"colour {result['colour']:.1%}  direction {result['direction']:.1%}  shape {result['shape']:.1%}  "
          f"all {result['all']:.1%}  one object {result['one_object']:.1%}  ghost-free {result['ghost_free']:.1%}  "
          f"edge width {result['edge_width']:.2f} px  ({result['n']} prompts, {result['seconds']:.1f} s)")  # fmt: skip
    for (prompt, want), seen in zip(result["cases"], result["observations"]):
        wanted, saw = (want.colour, want.shape, want.direction), (seen.colour, seen.shape, seen.direction)
        print(f"{'ok  ' if wanted == saw else 'MISS'} {prompt!r}: wanted {'/'.join(wanted)}, saw {'/'.join(saw)}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + markdown(result, args.model_dir))
    if args.strip:
        # One prompt per direction, from different combinations, so the strip shows all four motions.
        order = {}
        for i, (_, want) in enumerate(result["cases"]):
            order.setdefault(want.direction, i)
        save_strip(result["videos"][list(order.values())], args.strip)
        print("strip rows:", *(repr(result["cases"][i][0]) for i in order.values()), sep="\n  ")
    return result


if __name__ == "__main__":
    main()
