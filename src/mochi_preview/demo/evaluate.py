"""Adherence evaluator: the object's colour, shape and direction of motion, measured from the frames alone.

The object is whatever differs clearly from the background (each frame's median colour). Its colour is the median
of its pixels classified by hue (or as white when unsaturated), its direction the centroid's least-squares motion
over the clip, its shape the fill ratio of its bounding box (circle pi/4, square 1, triangle 1/2).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, Attributes

NONE = "none"  # what `observe` reports when it cannot tell (no object, or too few frames with one)
HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] for name, rgb in COLOURS.items() if name != "white"}


@dataclass(frozen=True)
class Observation:
    """What the evaluator saw: labels ("none" when unknown) and the measurements behind them."""

    colour: str
    shape: str
    direction: str
    rgb: tuple[float, float, float] | None = None  # median object colour in [0, 1]
    fill: float | None = None  # median object area / bounding-box area
    displacement: tuple[float, float] | None = None  # (dx, dy) over the clip, fractions of width/height, y down
    frames_found: int = 0


def classify_colour(rgb, min_saturation: float = 0.3) -> str:
    """The nearest of the named colours to an RGB triple in [0, 1]: white when unsaturated, else nearest hue."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if saturation < min_saturation:
        return "white"
    circular = lambda a, b: min(abs(a - b), 1 - abs(a - b))  # hue is an angle in turns
    return min(HUES, key=lambda name: circular(hue, HUES[name]))


def classify_shape(fill: float) -> str:
    """Fill ratio of the bounding box -> shape: triangle 0.5, circle 0.785, square 1 (cut halfway between)."""
    return "triangle" if fill < 0.66 else "circle" if fill < 0.92 else "square"


def _as_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 or float in [0, 1] -> float32 in [0, 1]."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be shaped (T, H, W, 3); got {x.shape}")
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else np.clip(x.astype(np.float32), 0.0, 1.0)


def object_masks(frames: np.ndarray, min_contrast: float = 0.15) -> np.ndarray:
    """(T, H, W) bool: pixels farther from their frame's median colour than half the frame's strongest contrast."""
    background = np.median(frames, axis=(1, 2), keepdims=True)  # (T, 1, 1, 3): the object covers a small part
    contrast = np.abs(frames - background).max(axis=-1)  # (T, H, W), largest channel difference
    peak = np.percentile(contrast, 99.9, axis=(1, 2), keepdims=True)  # (T, 1, 1), robust to a stray pixel
    # Half the peak cuts anti-aliased edges at half coverage, so areas (and fill ratios) come out right.
    return contrast > np.maximum(min_contrast, 0.5 * peak)


def observe(frames, still_threshold: float = 0.08, min_pixels: int = 4) -> Observation:
    """Measure colour, shape and direction of the object in one clip (T, H, W, 3); "none" where unknown."""
    x = _as_frames(frames)
    t, h, w, _ = x.shape
    masks = object_masks(x)  # (T, H, W)
    found = np.flatnonzero(masks.sum(axis=(1, 2)) >= min_pixels)
    if len(found) == 0:
        return Observation(NONE, NONE, NONE)

    rgb = np.median(x[masks & (masks.sum(axis=(1, 2)) >= min_pixels)[:, None, None]], axis=0)  # (3,)
    fills, centres = [], []
    for i in found:
        ys, xs = np.nonzero(masks[i])
        fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        centres.append((xs.mean(), ys.mean()))
    fill = float(np.median(fills))

    direction, displacement = NONE, None
    if len(found) >= 2:
        # Least-squares velocity of the centroid (pixels per frame) times the clip length: robust to jitter.
        slope = np.polyfit(found.astype(np.float64), np.array(centres), 1)[0]  # (2,) = (dx, dy) per frame
        dx, dy = slope * (t - 1) / np.array([w, h])
        displacement = (float(dx), float(dy))
        if max(abs(dx), abs(dy)) < still_threshold:
            direction = "still"
        elif abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
    return Observation(
        classify_colour(rgb), classify_shape(fill), direction, tuple(map(float, rgb)), fill, displacement, len(found)
    )


def adherence(frames_list, attributes_list: list[Attributes], **options) -> dict:
    """Accuracy of colour, direction and shape (and all three at once) of clips against their intended attributes."""
    if len(frames_list) != len(attributes_list):
        raise ValueError(f"{len(frames_list)} clips but {len(attributes_list)} attribute sets")
    seen = [observe(f, **options) for f in frames_list]
    hits = {
        "colour": [o.colour == a.colour for o, a in zip(seen, attributes_list)],
        "direction": [o.direction == a.direction for o, a in zip(seen, attributes_list)],
        "shape": [o.shape == a.shape for o, a in zip(seen, attributes_list)],
    }
    hits["all"] = [all(v) for v in zip(*hits.values())]
    scores = {k: float(np.mean(v)) if v else 0.0 for k, v in hits.items()}
    return {**scores, "n": len(seen), "observations": seen}
