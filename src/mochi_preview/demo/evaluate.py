"""Adherence evaluator: the object's colour, shape and direction of motion, measured from the frames alone.

The object is whatever differs clearly from the background (each frame's median colour). Its colour is the median
of its pixels classified by hue (or as white when unsaturated), its direction the centroid's least-squares motion
over the clip, its shape from two measures of each frame's largest object region: the fill ratio of its bounding box
(circle pi/4, square 1, triangle 1/2) and how far it reaches into the box's corners (`corner_reach`: square 1,
circle and triangle about 0.7). With
`hues=ALL_HUES` the colours include the new ones of `world.NEW_COLOURS` (lime, the LoRA proof's concept).

One clean object: `object_count` / `one_object_share` count connected regions that differ clearly from the
background, `ghost_level` the faint colour outside the main one (thresholds measured below). Crisp frames:
`edge_width`, how many pixels the object's outline takes to rise from the background to the object's colour.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .world import COLOURS, NEW_COLOURS, Attributes

NONE = "none"  # what `observe` reports when it cannot tell (no object, or too few frames with one)
_hue = lambda rgb: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0]
HUES = {name: _hue(rgb) for name, rgb in COLOURS.items() if name != "white"}
ALL_HUES = HUES | {name: _hue(rgb) for name, rgb in NEW_COLOURS.items()}  # with the LoRA proof's new colours


@dataclass(frozen=True)
class Observation:
    """What the evaluator saw: labels ("none" when unknown) and the measurements behind them."""

    colour: str
    shape: str
    direction: str
    rgb: tuple[float, float, float] | None = None  # median object colour in [0, 1]
    fill: float | None = None  # median object area / bounding-box area
    corners: float | None = None  # median corner reach (`corner_reach`): square 1, circle 0.71, triangle 0.75
    displacement: tuple[float, float] | None = None  # (dx, dy) over the clip, fractions of width/height, y down
    frames_found: int = 0


def classify_colour(rgb, min_saturation: float = 0.3, hues: dict[str, float] = HUES) -> str:
    """The nearest of the named colours to an RGB triple in [0, 1]: white when unsaturated, else the nearest of
    `hues` (ALL_HUES: with the new colours too)."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if saturation < min_saturation:
        return "white"
    circular = lambda a, b: min(abs(a - b), 1 - abs(a - b))  # hue is an angle in turns
    return min(hues, key=lambda name: circular(hue, hues[name]))


# A square's corners reach the corners of its bounding box: 1. A circle's diagonal extent is 1/sqrt(2) of its box's
# (0.71; pixel steps add ~0.25 / radius), an apex-up triangle's 3/4. Cut halfway between circle and square: a square
# whose corners are rounded by up to half its half-side, or whose sides are pinched in, is still a square.
SQUARE_CORNERS = 0.85
TRIANGLE_FILL = 0.66  # halfway between triangle (1/2) and circle (pi/4)


def corner_reach(ys: np.ndarray, xs: np.ndarray) -> float:
    """How far a region's pixels reach along the diagonals, relative to its bounding box: the extents of x + y and
    x - y over twice the box's width + height (pixel extents, each +1 per pixel). Square 1, circle ~0.71."""
    box = (xs.max() - xs.min() + 1) + (ys.max() - ys.min() + 1)
    diagonals = (np.ptp(xs + ys) + 2) + (np.ptp(xs - ys) + 2)
    return float(diagonals / (2 * box))


def classify_shape(fill: float, corners: float | None = None) -> str:
    """Square when the region fills its box's corners (`corners` >= SQUARE_CORNERS), else triangle or circle by fill
    ratio. Without `corners`, by fill alone (square >= 0.92): the evaluator's rule until the demo model of 13-19 px
    objects, which read its squares with pinched sides as circles."""
    if corners is None:
        return "triangle" if fill < TRIANGLE_FILL else "circle" if fill < 0.92 else "square"
    return "square" if corners >= SQUARE_CORNERS else "triangle" if fill < TRIANGLE_FILL else "circle"


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


def observe(frames, still_threshold: float = 0.08, min_pixels: int = 4, hues: dict[str, float] = HUES) -> Observation:
    """Measure colour (among `hues` and white), shape and direction of the object in one clip (T, H, W, 3); "none"
    where unknown."""
    x = _as_frames(frames)
    t, h, w, _ = x.shape
    masks = object_masks(x)  # (T, H, W)
    found = np.flatnonzero(masks.sum(axis=(1, 2)) >= min_pixels)
    if len(found) == 0:
        return Observation(NONE, NONE, NONE)

    rgb = np.median(x[masks & (masks.sum(axis=(1, 2)) >= min_pixels)[:, None, None]], axis=0)  # (3,)
    labels = label_regions(masks[found])  # the shape is the largest region's: a stray speck would widen the box
    sizes = _region_sizes(labels)
    sizes[:, 0] = 0
    fills, corners, centres = [], [], []
    for i, frame, largest in zip(found, labels, sizes.argmax(axis=1)):
        ys, xs = np.nonzero(frame == largest)
        fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
        corners.append(corner_reach(ys, xs))
        ys, xs = np.nonzero(masks[i])
        centres.append((xs.mean(), ys.mean()))
    fill, corner = float(np.median(fills)), float(np.median(corners))

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
        classify_colour(rgb, hues=hues),
        classify_shape(fill, corner),
        direction,
        tuple(map(float, rgb)),
        fill,
        corner,
        displacement,
        len(found),
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


# ---- one object, no ghosts -------------------------------------------------------------------------------------
# Thresholds are in [0, 1] units of "contrast": a pixel's largest channel difference from its frame's median colour.
# Measured on rendered ground truth (64x64): the background has contrast 0 and the weakest colour (red, 225 over a
# background of 16) 0.82 at full coverage, so OBJECT_CONTRAST = 0.4 keeps pixels at least half covered, as
# `object_masks` does; the smallest rendered object then has 45 pixels. Regions smaller than MIN_REGION_SHARE of the
# frame (8 pixels at 64x64) are specks: in the shipped demo model's generations most stray regions have 1-4 pixels.
# Ghost energy is contrast above GHOST_CONTRAST (the faintest colour that counts) more than GHOST_HALO pixels away
# from the main region (its blurred edge belongs to it). GHOST_FREE: rendered clips score 0, the demo VAE's own
# reconstructions of them 0.03 (median) and 0.13 (90th percentile), the shipped demo model's generations 0.07 and
# 0.33; a clip at or below 0.1 counts as free of ghosts (a copy of the object at a third of its contrast scores ~0.3).
OBJECT_CONTRAST = 0.4
MIN_REGION_SHARE = 1 / 512
GHOST_CONTRAST = 0.08
GHOST_HALO = 2
GHOST_FREE = 0.1


def contrast(frames) -> np.ndarray:
    """(T, H, W) in [0, 1]: each pixel's largest channel difference from its frame's median colour."""
    x = _as_frames(frames)
    return np.abs(x - np.median(x, axis=(1, 2), keepdims=True)).max(axis=-1)


def _max3x3(x: np.ndarray) -> np.ndarray:
    """The 3 x 3 neighbourhood maximum over the last two axes (separable: rows, then columns)."""
    rows = x.copy()
    rows[..., 1:, :] = np.maximum(rows[..., 1:, :], x[..., :-1, :])
    rows[..., :-1, :] = np.maximum(rows[..., :-1, :], x[..., 1:, :])
    out = rows.copy()
    out[..., 1:] = np.maximum(out[..., 1:], rows[..., :-1])
    out[..., :-1] = np.maximum(out[..., :-1], rows[..., 1:])
    return out


def label_regions(mask: np.ndarray) -> np.ndarray:
    """8-connected regions of a (..., H, W) bool mask: int labels, 0 outside, one positive label per region."""
    h, w = mask.shape[-2:]
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0).reshape(-1, h, w)
    # Each label names a pixel of its own region (at first, the pixel itself). Spread the largest label to the
    # neighbours, and let each pixel take the label of the pixel its label names (pointer jumping: far fewer rounds).
    while True:
        spread = np.where(mask.reshape(labels.shape), _max3x3(labels), 0)
        flat = spread.reshape(len(spread), -1)
        jumped = np.take_along_axis(np.pad(flat, ((0, 0), (1, 0))), flat, axis=1).reshape(spread.shape)
        spread = np.maximum(spread, jumped)
        if np.array_equal(spread, labels):
            return labels.reshape(mask.shape)
        labels = spread


def _region_sizes(labels: np.ndarray) -> np.ndarray:
    """(T, H * W + 1) pixel count of every label in each frame of (T, H, W) labels (column 0: the background)."""
    t, h, w = labels.shape
    flat = labels.reshape(t, -1) + (h * w + 1) * np.arange(t)[:, None]
    return np.bincount(flat.ravel(), minlength=t * (h * w + 1)).reshape(t, h * w + 1)


def object_counts(frames, threshold: float = OBJECT_CONTRAST, min_pixels: int | None = None) -> np.ndarray:
    """(T,) connected object regions (8-connected, at least `min_pixels` pixels of contrast above `threshold`;
    default MIN_REGION_SHARE of the frame) in each frame of a (T, H, W, 3) clip."""
    x = _as_frames(frames)
    min_pixels = max(1, round(MIN_REGION_SHARE * x.shape[1] * x.shape[2])) if min_pixels is None else min_pixels
    sizes = _region_sizes(label_regions(contrast(x) > threshold))[:, 1:]
    return (sizes >= min_pixels).sum(axis=1)


def object_count(frame, threshold: float = OBJECT_CONTRAST, min_pixels: int | None = None) -> int:
    """Connected object regions in one (H, W, 3) frame, uint8 or floats in [0, 1] (see `object_counts`)."""
    x = np.asarray(frame)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"frame must be shaped (H, W, 3); got {x.shape}")
    return int(object_counts(x[None], threshold, min_pixels)[0])


def one_object_share(frames, threshold: float = OBJECT_CONTRAST, min_pixels: int | None = None) -> float:
    """Share of a clip's (T, H, W, 3) frames with exactly one object region."""
    return float(np.mean(object_counts(frames, threshold, min_pixels) == 1))


def ghost_level(frames, floor: float = GHOST_CONTRAST, halo: int = GHOST_HALO) -> float:
    """Coloured energy outside the main object, as a share of the main object's: per frame, the summed contrast
    above `floor` of the pixels farther than `halo` pixels from the largest region, over the summed contrast of that
    region; the clip's mean. 0 for a clean render; a second full-strength copy of the object gives about 1. A frame
    without any object counts as 1 when anything in it is above `floor`, else 0."""
    c = contrast(frames)  # (T, H, W)
    labels = label_regions(c > OBJECT_CONTRAST)
    sizes = _region_sizes(labels)
    sizes[:, 0] = 0
    main = (labels == sizes.argmax(axis=1)[:, None, None]) & (labels > 0)  # (T, H, W)
    near = main
    for _ in range(halo):
        near = _max3x3(near)
    ghost = np.where(~near & (c > floor), c, 0.0).sum(axis=(1, 2))
    body = np.where(main, c, 0.0).sum(axis=(1, 2))
    empty = (c > floor).any(axis=(1, 2)).astype(float)
    return float(np.mean(np.where(body > 0, ghost / np.maximum(body, 1e-12), empty)))


# ---- crisp edges -----------------------------------------------------------------------------------------------
def edge_width(frames) -> float:
    """Pixels an object's outline takes to rise from background to full contrast, the median over a clip's frames
    (no reference needed): in each frame, the peak contrast over the mean slope (gradient length of the contrast map)
    where the contrast lies between a quarter and three quarters of its peak. A linear ramp over w pixels gives w.
    Central differences spread even a sharp step over two pixels: the demo world's anti-aliased renders give 1.6-2.0,
    the same renders blurred by a 5-tap binomial (sigma 1) 3.2-3.6. NaN when no frame shows an object."""
    c = contrast(frames)  # (T, H, W)
    gy, gx = np.gradient(c, axis=(1, 2))
    slope = np.hypot(gx, gy)
    widths = []
    for frame, s in zip(c, slope):
        peak = frame.max()
        band = (frame > 0.25 * peak) & (frame < 0.75 * peak)
        if peak > OBJECT_CONTRAST and band.any():
            widths.append(peak / max(float(s[band].mean()), 1e-6))
    return float(np.median(widths)) if widths else float("nan")


def clean_scores(clips) -> dict:
    """Shares of clips with one object in >= 95% of frames and free of ghosts; their median edge width (pixels)."""
    return {
        "one_object": float(np.mean([one_object_share(c) >= 0.95 for c in clips])),
        "ghost_free": float(np.mean([ghost_level(c) <= GHOST_FREE for c in clips])),
        "edge_width": float(np.nanmedian([edge_width(c) for c in clips])),
    }
