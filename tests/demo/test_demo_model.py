"""The demo model shipped in the package: it is the default model, and it follows held-out prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mochi_preview import MochiPipeline
from mochi_preview.demo.evaluate import adherence, clean_scores
from mochi_preview.demo.evaluate_model import generate, heldout_prompts, model_defaults
from mochi_preview.tiny import DEMO_MODEL_DIR, default_model_dir, demo_model_dir

DEFAULTS = model_defaults(DEMO_MODEL_DIR)


def test_the_shipped_demo_model_is_the_default(capsys):
    assert demo_model_dir() == DEMO_MODEL_DIR
    assert default_model_dir() == DEMO_MODEL_DIR
    assert "RANDOM" not in capsys.readouterr().err  # the random-model warning is for the fallback only
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20  # issue 15's limit
    stats = json.loads((DEMO_MODEL_DIR / "latent_stats.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 12


# Each held-out set: its 45 prompts in 3 wordings (seeds 0, 1, 2), 135 clips. Chance is 1/7 for colour, 1/4 for
# direction, 1/3 for shape. One object: exactly one object region in >= 95% of a clip's frames; ghost-free:
# ghost_level <= GHOST_FREE (both in demo/evaluate.py). The floors are issue 15's targets; the shipped model (build 8,
# bench/RESULTS.md "Demo model rebuild groundwork" §9) measured held-out 100 / 100 / 92.6 / 97.0 / 100% and filler
# 97.8 / 100 / 91.9 / 99.3 / 100%, at least two clips above each floor. Filler colour is one clip above its target
# (97%), so its floor sits one clip lower: fp32 sums in another order (another CPU) may flip a borderline clip.
FLOOR = {
    "heldout": {"colour": 0.97, "direction": 0.95, "shape": 0.90, "one_object": 0.95, "ghost_free": 0.95},
    "filler": {"colour": 0.96, "direction": 0.95, "shape": 0.90, "one_object": 0.95, "ghost_free": 0.95},
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")
    assert pipe.latent_stats is not None  # the demo VAE's own normalization, not the published one
    return pipe


@pytest.mark.parametrize("prompts", ["heldout", "filler"])
def test_demo_model_follows_held_out_prompts(pipe, prompts):
    """Held-out colour x shape x direction combinations in held-out sentence forms ("heldout") and in phrasings with
    filler words, capitals and punctuation ("filler"): colour, direction, shape, one clean object."""
    cases = [case for seed in SEEDS for case in heldout_prompts(seed, prompts)]
    assert len(cases) == 135
    videos = np.concatenate([generate(pipe, [p for p, _ in heldout_prompts(seed, prompts)], DEFAULTS, seed)
                             for seed in SEEDS])  # fmt: skip
    scores = adherence(list(videos), [a for _, a in cases]) | clean_scores(videos)
    seen = [(p, o.colour, o.shape, o.direction) for (p, _), o in zip(cases, scores["observations"])]
    low = {k: round(scores[k], 3) for k, floor in FLOOR[prompts].items() if scores[k] < floor}
    assert not low, (low, seen)


def test_cli_without_model_dir_uses_the_demo_model(tmp_path, capsys):
    from mochi_preview.infer import main
    from mochi_preview.video import read_video

    out = tmp_path / "v.mp4"
    assert main(["--prompt", "a red ball moving to the right", "--output", str(out), "--seed", "1", "--quiet"]) == 0
    assert "RANDOM" not in capsys.readouterr().err
    defaults = json.loads((DEMO_MODEL_DIR / "mochi_defaults.json").read_text())
    frames = read_video(out)[0]  # the model's own size and length, from its mochi_defaults.json
    assert frames.shape == (defaults["num_frames"], defaults["height"], defaults["width"], 3)
