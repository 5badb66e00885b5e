"""Text-encoder pretraining: a tiny T5 learns to name caption attributes, word order included, and resumes exactly."""

import numpy as np
import pytest
import torch

from mochi_preview.demo.build import caption_labels
from mochi_preview.demo.world import COLOURS, DIRECTION_WORDS, HELDOUT_COMBOS, MOVES, SHAPE_WORDS, SHAPES
from mochi_preview.text import TextEncoder
from mochi_preview.tiny import save_tiny_t5
from mochi_preview.train import TextTrainConfig, TextTrainer

torch.set_num_threads(1)

PLACES = ("left", "right", "top", "bottom")


def _text(folder) -> TextEncoder:
    save_tiny_t5(folder, d_model=64, seed=0)
    return TextEncoder.from_folder(folder)


def from_to(rng: np.random.Generator, n: int) -> tuple[list[str], torch.Tensor]:
    """Captions "a ball moves from A to B" labelled B: with A and B drawn from the same four words, only word order
    tells which is which."""
    pairs = [rng.choice(4, size=2, replace=False) for _ in range(n)]
    captions = [f"a ball moves from {PLACES[a]} to {PLACES[b]}" for a, b in pairs]
    return captions, torch.tensor([[b] for _, b in pairs])


def test_a_tiny_t5_learns_which_word_comes_after_to(tmp_path):
    cfg = TextTrainConfig(steps=150, batch_size=32, warmup=10, threads=1)
    trainer = TextTrainer(_text(tmp_path / "t5"), [4], from_to, cfg)
    every = [f"a ball moves from {a} to {b}" for a in PLACES for b in PLACES if a != b]  # all 12 orders
    labels = torch.tensor([[PLACES.index(c.split()[-1])] for c in every])
    trainer.fit(progress=False)
    losses = [h["loss"] for h in trainer.history]
    assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:10])
    # "from left to right" and "from right to left" hold the same pieces: all 12 are right only if order is read.
    assert trainer.accuracy(every, labels) == [1.0]


def test_the_position_bias_is_redrawn_only_when_asked(tmp_path):
    text = _text(tmp_path / "t5")
    bias = lambda t5: t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    before = bias(text.model).detach().clone()
    TextTrainer(text, [4], from_to, TextTrainConfig(position_bias_std=None, threads=1))
    torch.testing.assert_close(bias(text.model), before, rtol=0, atol=0)
    TextTrainer(text, [4], from_to, TextTrainConfig(position_bias_std=1.5, threads=1))
    assert 1.2 < float(bias(text.model).std()) < 1.8 and float(before.std()) < 0.5


def test_resume_gives_exactly_the_same_state(tmp_path):
    cfg = TextTrainConfig(steps=6, batch_size=8, warmup=2, threads=1, seed=3, checkpoint_every=100)
    straight = TextTrainer(_text(tmp_path / "a"), [4], from_to, cfg)
    straight.fit(progress=False)
    first = TextTrainer(_text(tmp_path / "b"), [4], from_to, cfg)
    first.fit(until=3, checkpoint=tmp_path / "ckpt", progress=False)
    resumed = TextTrainer(_text(tmp_path / "c"), [4], from_to, cfg)
    resumed.fit(checkpoint=tmp_path / "ckpt", progress=False)
    a, b = straight.state()[0], resumed.state()[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_demo_caption_labels_name_what_the_caption_says():
    captions, labels = caption_labels(np.random.default_rng(0), 300)
    assert labels.shape == (300, 3)
    for text, (c, s, d) in zip(captions, labels.tolist()):
        lower = text.lower()
        words = lower.replace(",", "").replace(".", "").split()
        assert list(COLOURS)[c] in words
        assert any(w in words for w in SHAPE_WORDS[SHAPES[s]])
        assert any(phrase in lower for phrase in DIRECTION_WORDS[MOVES[d]])
    opening = sum(w[0].isupper() for c in captions for w in c.split()[1:])  # words after the first
    assert 0.08 < opening / sum(len(c.split()) - 1 for c in captions) < 0.25  # capitalised at random, about 15%


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_demo_caption_labels_stay_inside_their_split(split):
    _, labels = caption_labels(np.random.default_rng(1), 200, split, split)
    held = {(list(COLOURS)[c], SHAPES[s], MOVES[d]) in HELDOUT_COMBOS for c, s, d in labels.tolist()}
    assert held == {split == "heldout"}
