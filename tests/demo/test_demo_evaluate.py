"""The adherence evaluator: perfect on rendered clips, rejects wrong colours and motions, copes with empty clips."""

import numpy as np
import pytest

from mochi_preview.demo import evaluate as E
from mochi_preview.demo import world as W


def _clips(seed: int, config: W.WorldConfig, attrs=None):
    attrs = attrs or W.combos("all", config.directions)
    rng = np.random.default_rng(seed)
    videos = W.render(attrs, W.sample_geometry(rng, attrs, config), config, rng)
    return [W.to_frames(v) for v in videos], attrs


@pytest.mark.parametrize(
    "seed, config",
    [
        (0, W.WorldConfig(directions=W.DIRECTIONS)),
        (1, W.WorldConfig(directions=W.DIRECTIONS)),
        (2, W.WorldConfig(directions=W.DIRECTIONS, antialias=False)),
        (3, W.WorldConfig(frames=13, height=48, width=80, colour_jitter=12)),
    ],
)
def test_perfect_on_rendered_clips(seed, config):
    frames, attrs = _clips(seed, config)
    scores = E.adherence(frames, attrs)
    assert (scores["colour"], scores["direction"], scores["shape"], scores["all"]) == (1.0, 1.0, 1.0, 1.0)
    assert scores["n"] == len(attrs)


def test_uint8_and_float_frames_agree_and_noise_is_tolerated():
    frames, attrs = _clips(4, W.WorldConfig())
    uint8 = [np.rint(f * 255).astype(np.uint8) for f in frames]
    assert E.adherence(uint8, attrs)["all"] == 1.0
    rng = np.random.default_rng(0)
    noisy = [np.clip(f + rng.normal(0, 0.04, f.shape), 0, 1) for f in frames]
    scores = E.adherence(noisy, attrs)
    assert scores["colour"] == scores["direction"] == 1.0 and scores["shape"] > 0.9


def test_wrong_colour_and_reversed_motion_are_rejected():
    attrs = [W.Attributes(c, s, d) for c in ("red", "purple") for s in W.SHAPES for d in W.MOVES]
    frames, _ = _clips(5, W.WorldConfig(), attrs)
    as_blue = [a._replace(colour="blue") for a in attrs]
    assert E.adherence(frames, as_blue)["colour"] == 0.0
    assert E.adherence(frames, as_blue)["direction"] == 1.0
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    reversed_ = E.adherence([f[::-1] for f in frames], [a._replace(direction=opposite[a.direction]) for a in attrs])
    assert reversed_["direction"] == 1.0
    assert E.adherence([f[::-1] for f in frames], attrs)["direction"] == 0.0
    frozen = [np.repeat(f[:1], len(f), axis=0) for f in frames]  # the first frame held: no motion
    assert {E.observe(f).direction for f in frozen} == {"still"}


def test_empty_and_uniform_clips_give_none():
    for frames in (np.zeros((25, 64, 64, 3), np.uint8), np.full((7, 32, 32, 3), 0.6, np.float32)):
        seen = E.observe(frames)
        assert (seen.colour, seen.shape, seen.direction) == ("none", "none", "none")
    assert E.adherence([np.zeros((25, 64, 64, 3))], [W.Attributes("red", "circle", "left")])["all"] == 0.0
    one_frame, _ = _clips(6, W.WorldConfig(frames=1), [W.Attributes("green", "square", "still")])
    seen = E.observe(one_frame[0])
    assert (seen.colour, seen.shape, seen.direction) == ("green", "square", "none")
    with pytest.raises(ValueError):
        E.observe(np.zeros((25, 64, 64)))
    with pytest.raises(ValueError):
        E.adherence([one_frame[0]], [])


def test_colour_classes_survive_dimming_and_washing_out():
    for name, rgb in W.COLOURS.items():
        rgb = np.array(rgb) / 255.0
        assert E.classify_colour(rgb) == name
        assert E.classify_colour(0.6 * rgb) == name  # darker
        if name != "white":
            assert E.classify_colour(0.75 * rgb + 0.25 * rgb.max()) == name  # less saturated
    assert E.classify_colour([0.5, 0.5, 0.55]) == "white"


def test_observation_reports_measurements():
    frames, attrs = _clips(7, W.WorldConfig(), [W.Attributes("yellow", "circle", "down")])
    seen = E.observe(frames[0])
    assert seen.frames_found == 25 and abs(seen.fill - np.pi / 4) < 0.08
    dx, dy = seen.displacement
    assert dy > 0.2 and abs(dx) < 0.01
    np.testing.assert_allclose(seen.rgb, np.array(W.COLOURS["yellow"]) / 255, atol=0.02)


@pytest.mark.parametrize("size, scale", [(32, 4), (64, 2)])
def test_strip_shows_evenly_spaced_frames_at_about_128_pixels(tmp_path, size, scale):
    from PIL import Image

    from mochi_preview.demo.evaluate_model import save_strip

    videos = np.zeros((2, 13, size, size, 3))
    videos[:, :, :, :, 0] = np.arange(13)[None, :, None, None] / 12  # frame t has red level t / 12
    save_strip(videos, tmp_path / "s.png", frames=7)
    strip = np.asarray(Image.open(tmp_path / "s.png"))
    tile = (size + 2) * scale  # a frame plus its 1-pixel border, enlarged
    assert strip.shape == (2 * tile, 7 * tile, 3)
    reds = [strip[tile // 2, i * tile + tile // 2, 0] for i in range(7)]
    assert reds == [round(t / 12 * 255) for t in (0, 2, 4, 6, 8, 10, 12)]
