"""What the demo model can draw: one coloured shape moving over a dark background. Prompts outside that get a hint."""

from __future__ import annotations

import re

from .world import COLOURS, DIRECTION_WORDS, SHAPE_WORDS

DEMO_PROMPT = "a red ball moving to the right"  # a sentence form and words of the demo's training captions

COLOUR_WORDS = tuple(COLOURS)
SHAPE_NAMES = tuple(w for words in SHAPE_WORDS.values() for w in words)
_WORD = re.compile(r"[a-z]+")


def prompt_warning(prompt: str) -> str | None:
    """A message listing the demo world's colours, shapes and directions for a prompt that names none of its shapes
    (its only objects: the lemon prompt names "yellow" and "up", yet the demo draws nothing sensible for it); None
    for a prompt that names one."""
    words = set(_WORD.findall(prompt.lower()))
    words |= {w[: -len(end)] for w in words for end in ("s", "es") if w.endswith(end)}  # circles, boxes
    if words & set(SHAPE_NAMES):
        return None
    return (
        "the demo model only draws one coloured shape moving over a dark background, and this prompt names none of "
        f"its shapes. Its colours: {', '.join(COLOUR_WORDS)}; shapes: {', '.join(SHAPE_NAMES)}; directions: "
        f"{', '.join(DIRECTION_WORDS)}. Try e.g. {DEMO_PROMPT!r}"
    )
