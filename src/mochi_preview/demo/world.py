"""The demo world: one coloured shape moving over a plain dark background, with varied English captions.

Everything is seeded through a `numpy.random.Generator`, so the same seed gives the same clips and captions.
Videos are uint8 tensors shaped (B, 3, T, H, W), like the frames the VAE encoder takes after `to_model_range`.

Two things are held out of training, for evaluation: a fixed set of colour x shape x direction combinations
(`HELDOUT_COMBOS`) and a set of sentence forms (`HELDOUT_TEMPLATES`). Held-out sentences reuse only words that
the training captions use too (a text encoder trained here cannot know a word it never saw), but in new orders.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# Saturated colours with well separated hues (red 0°, orange 30°, yellow 56°, green 128°, blue 225°, purple 282°).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 225, 30),
    "white": (235, 235, 235),
    "orange": (250, 135, 20),
    "purple": (165, 45, 225),
}
# Colours outside COLOURS, so outside every training split: the new concept the LoRA proof teaches (train/lora.py).
# Lime (81°) sits between yellow and green; the demo VAE reconstructs it at 74°-97° (pink and cyan it cannot: they
# come back purple and grey).
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"lime": (160, 235, 25)}
SHAPES = ("circle", "square", "triangle")
MOVES = ("left", "right", "up", "down")
DIRECTIONS = (*MOVES, "still")
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}  # (dx, dy), y down

# About 10% of the 84 moving combinations. Every colour, shape and direction, and every pair of them (e.g. red
# squares, squares moving left), still appears in training: only these exact triples are new.
HELDOUT_COMBOS = frozenset(
    [
        ("red", "square", "left"),
        ("green", "circle", "up"),
        ("blue", "triangle", "right"),
        ("yellow", "circle", "down"),
        ("white", "triangle", "left"),
        ("orange", "square", "up"),
        ("purple", "circle", "left"),
        ("green", "triangle", "down"),
        ("blue", "square", "down"),
    ]
)


class Attributes(NamedTuple):
    """What a clip shows: colour, shape and direction of motion ("still" for none)."""

    colour: str
    shape: str
    direction: str


@dataclass(frozen=True)
class WorldConfig:
    """Clip size and the ranges objects are drawn from (sizes and travel as fractions of the frame)."""

    frames: int = 25
    height: int = 64
    width: int = 64
    directions: tuple[str, ...] = MOVES  # add "still" for objects that stay put
    size_range: tuple[float, float] = (0.20, 0.30)  # half-extent (circle radius) / min(H, W): 13-19 px at 64x64
    travel_range: tuple[float, float] = (0.4, 1.0)  # distance travelled / the room the object has to move
    margin: float = 2.0  # pixels kept free between the object and the border
    background: tuple[int, int, int] = (16, 16, 16)
    colour_jitter: int = 0  # uniform +-jitter per channel and clip, in uint8 units
    antialias: bool = True


def combos(split: str = "train", directions: tuple[str, ...] = MOVES) -> list[Attributes]:
    """Colour x shape x direction combinations of a split: "train", "heldout" or "all" (sorted, deterministic)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all'; got {split!r}")
    out = []
    for c, s, d in itertools.product(COLOURS, SHAPES, directions):
        held = (c, s, d) in HELDOUT_COMBOS
        if split == "all" or held == (split == "heldout"):
            out.append(Attributes(c, s, d))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rendering


class Geometry(NamedTuple):
    """Per-clip geometry in pixels: half-extent (B,), start and end centres (B, 2) as (x, y)."""

    size: np.ndarray
    start: np.ndarray
    end: np.ndarray


def sample_geometry(rng: np.random.Generator, attrs: list[Attributes], config: WorldConfig) -> Geometry:
    """Random size, start and travel such that the whole object stays inside the frame in every frame."""
    n, h, w = len(attrs), config.height, config.width
    size = rng.uniform(*config.size_range, n) * min(h, w)  # (B,)
    lo = size + config.margin  # lowest allowed centre coordinate, on both axes
    hi = np.stack([w - lo, h - lo], axis=1)  # (B, 2) highest allowed (x, y)
    step = np.array([STEP[a.direction] for a in attrs], dtype=np.float64)  # (B, 2)
    travel = rng.uniform(*config.travel_range, n)[:, None] * (hi - lo[:, None]) * np.abs(step)  # (B, 2)
    # Moving towards +: start in [lo, hi - travel]; towards -: in [lo + travel, hi]; still axes anywhere in [lo, hi].
    u = rng.uniform(0.0, 1.0, (n, 2))
    start = lo[:, None] + np.where(step < 0, travel, 0.0) + u * (hi - lo[:, None] - travel)
    return Geometry(size, start, start + step * travel)


def render(attrs: list[Attributes], geometry: Geometry, config: WorldConfig, rng=None) -> torch.Tensor:
    """Draw clips: (B, 3, T, H, W) uint8. `rng` is only needed when config.colour_jitter > 0."""
    n, t, h, w = len(attrs), config.frames, config.height, config.width
    frac = np.linspace(0.0, 1.0, t)[None, :, None]  # (1, T, 1)
    centre = geometry.start[:, None] + frac * (geometry.end - geometry.start)[:, None]  # (B, T, 2)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres
    dx = (xs[None, None, None, :] - centre[..., 0, None, None]).astype(np.float32)  # (B, T, 1, W)
    dy = (ys[None, None, :, None] - centre[..., 1, None, None]).astype(np.float32)  # (B, T, H, 1)
    r = geometry.size.astype(np.float32)[:, None, None, None]  # (B, 1, 1, 1)

    # Signed distance to each shape's outline (negative inside), in pixels.
    sdf = np.empty((n, t, h, w), dtype=np.float32)
    for shape in SHAPES:
        idx = np.array([a.shape == shape for a in attrs])
        if not idx.any():
            continue
        x, y, s = dx[idx], dy[idx], r[idx]
        if shape == "circle":
            sdf[idx] = np.sqrt(x**2 + y**2) - s
        elif shape == "square":
            sdf[idx] = np.maximum(np.abs(x), np.abs(y)) - s
        else:  # apex up at (0, -s), base corners (+-s, s): the largest distance to the three edge lines
            sides = (2 * np.abs(x) - (y + s)) / np.sqrt(5.0)
            sdf[idx] = np.maximum(sides, y - s)
    # Coverage of each pixel: a one-pixel linear ramp across the outline approximates box-filtered edges.
    cover = np.clip(0.5 - sdf, 0.0, 1.0) if config.antialias else (sdf <= 0).astype(np.float32)  # (B, T, H, W)

    colour = np.array([(COLOURS | NEW_COLOURS)[a.colour] for a in attrs], dtype=np.float32)  # (B, 3)
    if config.colour_jitter:
        if rng is None:
            raise ValueError("render needs `rng` when config.colour_jitter > 0")
        colour = np.clip(colour + rng.integers(-config.colour_jitter, config.colour_jitter + 1, colour.shape), 0, 255)
    bg = np.array(config.background, dtype=np.float32)[None, :, None, None, None]  # (1, 3, 1, 1, 1)
    video = bg + cover[:, None] * (colour[:, :, None, None, None] - bg)  # (B, 3, T, H, W)
    return torch.from_numpy(np.rint(video).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Captions

SHAPE_WORDS = {"circle": ("circle", "ball", "disc"), "square": ("square", "box"), "triangle": ("triangle",)}
ADJECTIVES = ("small", "bright")
VERBS = ("moves", "slides", "drifts", "travels", "glides")  # "-s" forms; "-ing" forms below
STILL_VERBS = ("stays", "sits", "rests", "remains")
DIRECTION_WORDS = {
    "left": ("to the left", "leftward", "towards the left", "from right to left"),
    "right": ("to the right", "rightward", "towards the right", "from left to right"),
    "up": ("up", "upward", "towards the top", "from bottom to top"),
    "down": ("down", "downward", "towards the bottom", "from top to bottom"),
    "still": ("still", "in place", "in one spot"),
}
BACKGROUNDS = (
    "on a dark background",
    "on a black background",
    "against a dark background",
    "over a plain dark background",
)

# Slots: {obj} = article, adjectives, colour, shape word; {noun} = adjectives and shape word; {colour}; {shape}
# (shape word alone); {verbs} / {verbing}; {dir}; {bg}.
TRAIN_TEMPLATES = (
    "{obj} {verbs} {dir}",
    "{obj} {verbing} {dir}",
    "{obj} {verbs} {dir} {bg}",
    "{obj} {verbing} {dir} {bg}",
    "{obj} is {verbing} {dir}",
    "there is {obj} and it {verbs} {dir}",
    "a video of {obj} {verbing} {dir}",
    "{bg}, {obj} {verbs} {dir}",
    "the {colour} {shape} {verbs} {dir}",
)
# New sentence forms (colour after the noun, a bare noun phrase, the background in the middle), same words.
HELDOUT_TEMPLATES = (
    "the {noun} is {colour} and it {verbs} {dir}",
    "there is {obj} {verbing} {dir}",
    "{obj} {bg} is {verbing} {dir}",
    "{colour} {shape}, {verbing} {dir}",
    "{dir}, {obj} {verbs}",
)


# Held-out phrasings with filler words no caption uses (the model must carry on past what it does not know), and
# capitalisation and punctuation no caption has. {dir_screen}: the direction towards a side of the screen.
FILLER_TEMPLATES = (
    "{obj} {verbs} {dir_screen}",
    "in this video {obj} {verbs} {dir}",
    "{obj} {verbs} slowly {dir}",
    "please show {obj} {verbing} {dir}",
    "{OBJ} {VERBS} {DIR}!",
)
SCREEN_DIRECTIONS = {
    "left": "to the left side of the screen",
    "right": "to the right side of the screen",
    "up": "up to the top of the screen",
    "down": "down to the bottom of the screen",
    "still": "in the middle of the screen",
}


# Training-caption noise (the build's --caption_noise): filler words of its own, none of the held-out filler
# phrasings' words, and whole captions in capitals, so that the model learns to read past what does not matter.
TRAIN_OPENINGS = ("here", "now", "we see", "look,", "watch as")
TRAIN_ENDINGS = ("here", "now", "in the clip", "across the frame", "steadily")


def _pick(rng: np.random.Generator, options: tuple):
    return options[rng.integers(len(options))]


def noisy_caption(rng: np.random.Generator, text: str, rate: float) -> str:
    """With probability `rate`, `text` with a filler opening, a filler ending or in capitals (an even pick);
    unchanged otherwise. No random number is drawn when `rate` is 0 (captions as before, stream unchanged)."""
    if rate <= 0 or rng.random() >= rate:
        return text
    kind, body = rng.integers(3), text.rstrip(".")
    if kind == 0:
        return f"{_pick(rng, TRAIN_OPENINGS)} {body[0].lower() + body[1:]}"
    if kind == 1:
        return f"{body} {_pick(rng, TRAIN_ENDINGS)}"
    return text.upper()


def _ing(verb: str) -> str:
    """ "moves" -> "moving", "sits" -> "sitting", "stays" -> "staying"."""
    stem = verb[:-1]
    if stem.endswith("e"):
        return stem[:-1] + "ing"
    if stem == "sit":
        return "sitting"
    return stem + "ing"


def caption(rng: np.random.Generator, attrs: Attributes, phrasing: str = "train", template: str | None = None) -> str:
    """A random English caption for `attrs` using the "train", "heldout", "filler" or "all" (train + heldout)
    sentence forms (or `template`)."""
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES, "filler": FILLER_TEMPLATES,
                 "all": TRAIN_TEMPLATES + HELDOUT_TEMPLATES}  # fmt: skip
    if phrasing not in templates:
        raise ValueError(f"phrasing must be one of {sorted(templates)}; got {phrasing!r}")
    if template is None:
        template = templates[phrasing][rng.integers(len(templates[phrasing]))]
    pick = lambda options: _pick(rng, options)
    adjectives = [a for a in ADJECTIVES if rng.random() < 0.2]
    shape = pick(SHAPE_WORDS[attrs.shape])
    noun = " ".join([*adjectives, shape])
    verb = pick(STILL_VERBS if attrs.direction == "still" else VERBS)
    slots = dict(
        obj=" ".join([pick(("a", "a", "the", "one")), *adjectives, attrs.colour, shape]),
        noun=noun,
        colour=attrs.colour,
        shape=shape,
        verbs=verb,
        verbing=_ing(verb),
        dir=pick(DIRECTION_WORDS[attrs.direction]),
        bg=pick(BACKGROUNDS),
        dir_screen=SCREEN_DIRECTIONS[attrs.direction],
    )
    text = template.format(**slots, **{k.upper(): v.upper() for k, v in slots.items()})
    text = re.sub(r"\b([aA]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a orange" -> "an orange"
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.3 and not text.endswith("!") else text


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def sample_attributes(
    rng: np.random.Generator, n: int, split: str = "train", config: WorldConfig = WorldConfig()
) -> list[Attributes]:
    """n attribute triples drawn uniformly from the combinations of a split."""
    pool = combos(split, config.directions)
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def sample_batch(
    rng: np.random.Generator,
    n: int,
    split: str = "train",
    phrasing: str | None = None,
    config: WorldConfig = WorldConfig(),
) -> tuple[torch.Tensor, list[str], list[Attributes]]:
    """n random clips (B, 3, T, H, W) uint8, their captions and attributes; phrasing defaults to the split's."""
    attrs = sample_attributes(rng, n, split, config)
    videos = render(attrs, sample_geometry(rng, attrs, config), config, rng)
    phrasing = phrasing or split
    return videos, [caption(rng, a, phrasing) for a in attrs], attrs


def to_model_range(videos: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the VAE encoder's input range."""
    return videos.float() / 127.5 - 1.0


def to_frames(video: torch.Tensor) -> np.ndarray:
    """One clip (3, T, H, W), uint8 or float in [-1, 1] -> (T, H, W, 3) float32 in [0, 1] for the evaluator."""
    x = video.detach().float().cpu()
    x = x / 255.0 if video.dtype == torch.uint8 else (x.clamp(-1, 1) + 1) / 2
    return x.permute(1, 2, 3, 0).numpy()
