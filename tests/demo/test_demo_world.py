"""The demo world: seeded clips that keep the object in view and move as labelled, captions, held-out splits."""

import re
import time
from itertools import combinations

import numpy as np
import pytest
import torch

from mochi_preview.demo import world as W


def _centroids(video: torch.Tensor, config: W.WorldConfig) -> np.ndarray:
    """(T, 2) object centroids (x, y) from the pixels that differ from the background."""
    bg = torch.tensor(config.background)[:, None, None, None]
    mask = (video.int() - bg).abs().amax(dim=0) > 40  # (T, H, W)
    ys, xs = torch.meshgrid(torch.arange(config.height), torch.arange(config.width), indexing="ij")
    area = mask.sum(dim=(1, 2)).float()
    return torch.stack([(mask * xs).sum(dim=(1, 2)) / area, (mask * ys).sum(dim=(1, 2)) / area], 1).numpy()


def test_same_seed_same_batch_and_other_seed_differs():
    a = W.sample_batch(np.random.default_rng(7), 6)
    b = W.sample_batch(np.random.default_rng(7), 6)
    c = W.sample_batch(np.random.default_rng(8), 6)
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("config", [W.WorldConfig(), W.WorldConfig(frames=13, height=48, width=80)])
def test_shapes_range_and_object_inside_the_frame(config):
    videos, captions, attrs = W.sample_batch(np.random.default_rng(0), 40, split="all", config=config)
    assert videos.shape == (40, 3, config.frames, config.height, config.width) and videos.dtype == torch.uint8
    assert len(captions) == len(attrs) == 40
    bg = torch.tensor(config.background, dtype=torch.uint8)
    for v in videos:
        for border in (v[:, :, 0], v[:, :, -1], v[:, :, :, 0], v[:, :, :, -1]):  # (3, T, W or H)
            assert torch.equal(border, bg[:, None, None].expand_as(border))  # never touches an edge
    x = W.to_model_range(videos)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    frames = W.to_frames(videos[0])
    assert frames.shape == (config.frames, config.height, config.width, 3) and 0 <= frames.min() <= frames.max() <= 1
    np.testing.assert_allclose(W.to_frames(x[0]), frames, atol=1e-6)


def test_objects_move_as_labelled_and_colour_is_exact():
    config = W.WorldConfig(directions=W.DIRECTIONS)
    attrs = W.combos("all", W.DIRECTIONS)
    videos = W.render(attrs, W.sample_geometry(np.random.default_rng(1), attrs, config), config)
    for video, a in zip(videos, attrs):
        c = _centroids(video, config)
        dx, dy = (c[-1] - c[0]) / config.width
        expected = np.array(W.STEP[a.direction])
        if a.direction == "still":
            assert abs(dx) < 1e-3 and abs(dy) < 1e-3
        else:
            # The right way, at least the least share of the least room any object has (the largest one's).
            room = config.width - 2 * (config.size_range[1] * config.width + config.margin)
            assert np.dot([dx, dy], expected) * config.width > config.travel_range[0] * room - 0.5
            assert abs(np.dot([dx, dy], expected[::-1])) < 0.01  # and not sideways (< 1 pixel)
        # The object's interior has exactly the named colour.
        pixels = video.reshape(3, -1).T
        assert (pixels == torch.tensor(W.COLOURS[a.colour], dtype=torch.uint8)).all(dim=1).any()


def test_antialiasing_only_softens_edges():
    config = W.WorldConfig()
    attrs = [W.Attributes("white", s, "right") for s in W.SHAPES]
    geometry = W.sample_geometry(np.random.default_rng(2), attrs, config)
    soft = W.render(attrs, geometry, config).float()
    hard = W.render(attrs, geometry, W.WorldConfig(antialias=False)).float()
    assert set(hard.unique().tolist()) == {16.0, 235.0}
    assert len(soft.unique()) > 10  # intermediate levels on the outline
    assert (soft - hard).abs().mean() < 2.0  # only edge pixels differ


def test_rendering_is_fast():
    rng = np.random.default_rng(0)
    W.sample_batch(rng, 4)
    start = time.perf_counter()
    W.sample_batch(rng, 64)
    assert (time.perf_counter() - start) / 64 < 0.03  # about 3 ms a clip on one core


def test_heldout_combinations_are_a_tenth_and_leave_every_pair_in_training():
    train, held = W.combos("train"), W.combos("heldout")
    assert len(train) + len(held) == 84 and 6 <= len(held) <= 12
    assert set(held) == {W.Attributes(*c) for c in W.HELDOUT_COMBOS} and not set(train) & set(held)
    for i, j in combinations(range(3), 2):  # every (colour, shape), (colour, dir), (shape, dir) pair is trained
        assert {(a[i], a[j]) for a in train} == {(a[i], a[j]) for a in train + held}
    rng = np.random.default_rng(0)
    assert all(a in held for a in W.sample_batch(rng, 50, split="heldout")[2])
    assert not any(a in held for a in W.sample_batch(rng, 200, split="train")[2])
    with_still = W.combos("train", W.DIRECTIONS)
    assert {a.direction for a in with_still} == set(W.DIRECTIONS)


WORD = re.compile(r"[a-z]+")


def test_captions_name_the_attributes_with_varied_wording():
    rng = np.random.default_rng(3)
    captions = set()
    for a in W.combos("all", W.DIRECTIONS):
        for phrasing in ("train", "heldout"):
            for _ in range(5):
                text = W.caption(rng, a, phrasing)
                captions.add(text)
                lower = text.lower()
                assert a.colour in WORD.findall(lower)
                assert any(w in WORD.findall(lower) for w in W.SHAPE_WORDS[a.shape])
                assert any(p in lower for p in W.DIRECTION_WORDS[a.direction])
                assert "  " not in text and not re.search(r"\ba [aeiou]", lower)
    assert len(captions) > 0.9 * 2 * 5 * 105  # nearly all distinct


def _template_regex(template: str) -> re.Pattern:
    """A regex matching exactly the sentences a template can produce (any case, optional final period)."""
    alt = lambda words: "(?:" + "|".join(map(re.escape, words)) + ")"
    colour, shape = alt(W.COLOURS), alt(w for ws in W.SHAPE_WORDS.values() for w in ws)
    slots = {
        "obj": rf"(?:a|an|the|one)(?: small)?(?: bright)? {colour} {shape}",
        "noun": rf"(?:small )?(?:bright )?{shape}",
        "colour": colour,
        "shape": shape,
        "verbs": alt(W.VERBS + W.STILL_VERBS),
        "verbing": alt(W._ing(v) for v in W.VERBS + W.STILL_VERBS),
        "dir": alt(p for ps in W.DIRECTION_WORDS.values() for p in ps),
        "bg": alt(W.BACKGROUNDS),
    }
    body = re.sub(r"\\{(\w+)\\}", lambda m: slots[m.group(1)], re.escape(template))
    return re.compile(rf"^{body}\.?$", re.IGNORECASE)


def test_filler_phrasings_add_words_the_captions_never_use_and_keep_the_attributes():
    """The held-out set with filler words (issue 15): new words, capitals and punctuation around the same attributes."""
    from mochi_preview.demo.evaluate_model import heldout_prompts

    rng = np.random.default_rng(4)
    attrs = W.combos("all", W.DIRECTIONS)
    vocabulary = {w for i in range(2000) for w in WORD.findall(W.caption(rng, attrs[i % len(attrs)], "all").lower())}
    cases = heldout_prompts(0, "filler")
    assert len(cases) == len(W.HELDOUT_COMBOS) * len(W.FILLER_TEMPLATES) == 45
    new = {w for p, _ in cases for w in WORD.findall(p.lower())} - vocabulary
    assert {"screen", "slowly", "please", "show", "this"} <= new
    for prompt, want in cases:  # each names its own colour, a word of its shape and its direction
        words = prompt.lower()
        assert want.colour in words and any(s in words for s in W.SHAPE_WORDS[want.shape]), prompt
        assert W.SCREEN_DIRECTIONS[want.direction] in words or any(
            d in words for d in W.DIRECTION_WORDS[want.direction]
        )
    shouted = [p for p, _ in cases if p.endswith("!")]
    assert len(shouted) == len(W.HELDOUT_COMBOS) and all(p == p.upper() for p in shouted)
    assert heldout_prompts(0, "filler") == cases and heldout_prompts(1, "filler") != cases  # the seed picks wordings
    with pytest.raises(ValueError, match="prompts must be one of"):
        heldout_prompts(0, "other")


def test_training_caption_noise_uses_no_word_of_the_held_out_filler_phrasings():
    from mochi_preview.demo.evaluate_model import heldout_prompts

    rng = np.random.default_rng(5)
    attrs = W.combos("train")
    plain = [W.caption(rng, attrs[i % len(attrs)], "train") for i in range(300)]
    assert [W.noisy_caption(rng, c, 0.0) for c in plain] == plain  # rate 0: untouched, and no draw
    noisy = [W.noisy_caption(rng, c, 1.0) for c in plain]
    kinds = [c.isupper() or c.split()[0] in {o.split()[0] for o in W.TRAIN_OPENINGS} or c.endswith(W.TRAIN_ENDINGS)
             for c in noisy]  # fmt: skip
    assert all(kinds) and sum(c.isupper() for c in noisy) > 60  # about a third of each kind
    every = W.combos("all", W.DIRECTIONS)
    known = [W.caption(rng, every[i % len(every)], "all") for i in range(2000)]
    vocabulary = {w for t in known for w in WORD.findall(t.lower())}
    filler_words = {w for p, _ in heldout_prompts(0, "filler") for w in WORD.findall(p.lower())} - vocabulary
    noise_words = {w for t in noisy for w in WORD.findall(t.lower())} - vocabulary
    assert noise_words and noise_words.isdisjoint(filler_words), noise_words & filler_words


def test_heldout_phrasings_are_new_forms_of_known_words():
    rng = np.random.default_rng(4)
    attrs = W.combos("all", W.DIRECTIONS)
    train = [W.caption(rng, attrs[i % len(attrs)], "train") for i in range(2000)]
    held = [W.caption(rng, attrs[i % len(attrs)], "heldout") for i in range(500)]
    vocabulary = {w for t in train for w in WORD.findall(t.lower())}
    assert {w for t in held for w in WORD.findall(t.lower())} <= vocabulary  # no unseen word
    train_forms = [_template_regex(t) for t in W.TRAIN_TEMPLATES]
    held_forms = [_template_regex(t) for t in W.HELDOUT_TEMPLATES]
    assert all(any(p.match(t) for p in train_forms) for t in train)
    assert all(any(p.match(t) for p in held_forms) for t in held)
    assert not any(p.match(t) for p in train_forms for t in held)  # no held-out sentence is a training form
    assert len({next(i for i, p in enumerate(held_forms) if p.match(t)) for t in held}) == len(held_forms)
    with pytest.raises(ValueError):
        W.caption(rng, attrs[0], "other")
