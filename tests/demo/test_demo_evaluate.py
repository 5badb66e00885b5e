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


def _drawn(inside, size: int = 64, frames: int = 5) -> np.ndarray:
    """(T, H, W, 3) clip of a red region `inside(x, y)` (pixel offsets from the centre, moving right) on black."""
    ys, xs = np.mgrid[:size, :size] + 0.5
    clip = np.zeros((frames, size, size, 3), np.float32)
    for t in range(frames):
        clip[t, inside(xs - size / 2 + 2 * t - frames, ys - size / 2)] = (0.9, 0.1, 0.1)
    return clip


def test_shape_reads_what_a_viewer_sees_not_only_the_fill_ratio():
    s = 14.0  # half-extent in pixels
    big, small = lambda x, y: np.maximum(abs(x), abs(y)), lambda x, y: np.minimum(abs(x), abs(y))
    # Sides pushed in by 15% at their middles, corners in place: the demo DiT's squares (fill ratio ~0.87).
    pinched = _drawn(lambda x, y: big(x, y) <= s * (1 - 0.15 * (1 - (small(x, y) / s) ** 2)))
    rounded = _drawn(lambda x, y: abs(x) ** 4 + abs(y) ** 4 <= s**4)  # a squircle
    angle = lambda x, y: np.arctan2(y, x)
    lumpy = _drawn(lambda x, y: np.hypot(x, y) <= s * (1 + 0.1 * np.cos(4 * angle(x, y))))  # diamond-ish blob
    wavy = _drawn(lambda x, y: np.hypot(x, y) <= s * (1 + 0.06 * np.cos(5 * angle(x, y) + 1)))
    seen = {name: E.observe(clip) for name, clip in
            [("pinched", pinched), ("rounded", rounded), ("lumpy", lumpy), ("wavy", wavy)]}  # fmt: skip
    assert {k: o.shape for k, o in seen.items()} == dict(
        pinched="square", rounded="square", lumpy="circle", wavy="circle"
    )
    assert E.classify_shape(seen["pinched"].fill) == "circle"  # the fill ratio alone misreads the pinched square
    speck = pinched.copy()
    speck[:, 2, 2] = (0.9, 0.1, 0.1)  # a stray pixel far away does not widen the object's box
    assert E.observe(speck).shape == "square"


def test_shape_survives_a_blur():
    frames, attrs = _clips(8, W.WorldConfig(size_range=(0.15, 0.3)))
    k = np.array([1, 4, 6, 4, 1], np.float32) / 16  # binomial, sigma 1
    blur = lambda f: np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, np.apply_along_axis(
        lambda r: np.convolve(r, k, "same"), 2, f))  # fmt: skip
    assert E.adherence([blur(f) for f in frames], attrs)["shape"] == 1.0
