"""One object and no ghosts: object_count, one_object_share and ghost_level on rendered demo-world clips."""

import numpy as np
import pytest

from mochi_preview.demo import evaluate as E
from mochi_preview.demo import world as W


def _rendered(seed: int, attrs, config=None):
    config = config or W.WorldConfig()
    rng = np.random.default_rng(seed)
    return W.render(attrs, W.sample_geometry(rng, attrs, config), config)


def _still(colour: str, shape: str, x: float, y: float, size: float = 6.0):
    """One rendered clip (T, H, W, 3) uint8 of an object kept still at (x, y) pixels."""
    centre = np.array([[x, y]])
    geometry = W.Geometry(np.array([size]), centre, centre)
    video = W.render([W.Attributes(colour, shape, "still")], geometry, W.WorldConfig())
    return video[0].permute(1, 2, 3, 0).numpy()


@pytest.mark.parametrize("config", [W.WorldConfig(), W.WorldConfig(frames=7, height=48, width=80, antialias=False)])
def test_every_rendered_frame_has_one_object(config):
    colours = list(W.COLOURS)
    attrs = [W.Attributes(colours[i % 7], s, d) for i, (s, d) in enumerate(zip(W.SHAPES * 5, W.DIRECTIONS * 3))]
    for video in _rendered(0, attrs, config):
        frames = video.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3) uint8
        assert E.one_object_share(frames) == 1.0
        assert E.object_count(frames[0]) == 1
        assert E.one_object_share(frames.astype(np.float32) / 255) == 1.0  # floats in [0, 1] too


def test_two_rendered_objects_count_two_and_touching_ones_one():
    a, b = _still("red", "square", 16, 32), _still("blue", "circle", 46, 32)
    two = np.where(np.abs(b.astype(int) - 16).max(-1, keepdims=True) > 0, b, a)  # b drawn over a
    assert E.object_count(two[0]) == 2
    assert E.one_object_share(two) == 0.0
    c = _still("blue", "circle", 27, 32)  # its left edge touches the square's right edge: one region
    touching = np.where(np.abs(c.astype(int) - 16).max(-1, keepdims=True) > 0, c, a)
    assert E.object_count(touching[0]) == 1
    empty = np.full_like(a[0], 16)
    assert E.object_count(empty) == 0
    speck = empty.copy()
    speck[10:12, 10:12] = 200  # 4 pixels: smaller than MIN_REGION_SHARE of the frame (8 pixels)
    assert E.object_count(speck) == 0 and E.object_count(speck, min_pixels=4) == 1


def test_diagonal_neighbours_are_one_region():
    mask = np.eye(6, dtype=bool)
    mask[0, 5] = True  # a lone pixel
    labels = E.label_regions(mask)
    assert len(np.unique(labels[np.eye(6, dtype=bool)])) == 1
    assert len(np.unique(labels[labels > 0])) == 2
    assert (labels[~mask] == 0).all()


def test_clean_renders_are_free_of_ghosts_and_a_faint_copy_is_not():
    attrs = [W.Attributes(c, s, "right") for c in W.COLOURS for s in W.SHAPES]
    clips = [v.permute(1, 2, 3, 0).numpy() for v in _rendered(1, attrs)]
    assert max(E.ghost_level(f) for f in clips) <= E.GHOST_FREE
    for f in clips[:6]:
        copy = np.roll(f.astype(np.float32), 28, axis=1)  # the object again, half a frame lower, a third as bright
        ghosted = np.maximum(f.astype(np.float32), 16 + (copy - 16) / 3).round().astype(np.uint8)
        assert E.ghost_level(ghosted) > E.GHOST_FREE
        assert E.one_object_share(ghosted) == 1.0  # too faint to be a second object: a ghost


def test_object_count_rejects_a_clip():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        E.object_count(np.zeros((4, 8, 8, 3), np.uint8))


def test_edge_width_measures_the_outline_ramp():
    # A bright vertical band (a third of the frame) whose sides ramp linearly over w pixels: edge_width gives w.
    for w in (4, 6, 8):
        x = np.arange(48)
        ramp = np.clip(np.minimum((x - 8) / w, (32 - x) / w), 0, 1)  # (W,) up over w pixels at 8, down at 32
        frame = np.broadcast_to(ramp[None, :, None], (48, 48, 3)) * 0.9
        assert E.edge_width(frame[None]) == pytest.approx(w, rel=0.15)
    # Rendered clips are crisp; the same clips blurred (5-tap binomial, sigma 1) are not, and no object gives NaN.
    attrs = [W.Attributes(c, s, "left") for c in W.COLOURS for s in W.SHAPES]
    clips = [v.permute(1, 2, 3, 0).numpy().astype(np.float32) / 255 for v in _rendered(2, attrs)]
    tap = np.array([1, 4, 6, 4, 1]) / 16
    blur = lambda x, axis: sum(t * np.roll(x, k - 2, axis=axis) for k, t in enumerate(tap))
    for f in clips:
        assert E.edge_width(f) < 2.1
        assert E.edge_width(blur(blur(f, 1), 2)) > 2.9
    assert np.isnan(E.edge_width(np.full((3, 16, 16, 3), 0.2)))
