"""The demo world (clips of a coloured shape with captions) and the adherence evaluator of generated clips."""

from .evaluate import Observation, adherence, classify_colour, observe
from .world import (
    COLOURS,
    DIRECTIONS,
    HELDOUT_COMBOS,
    HELDOUT_TEMPLATES,
    MOVES,
    SHAPES,
    TRAIN_TEMPLATES,
    Attributes,
    WorldConfig,
    caption,
    combos,
    render,
    sample_batch,
    sample_geometry,
    to_frames,
    to_model_range,
)

__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "HELDOUT_COMBOS",
    "HELDOUT_TEMPLATES",
    "MOVES",
    "SHAPES",
    "TRAIN_TEMPLATES",
    "Attributes",
    "Observation",
    "WorldConfig",
    "adherence",
    "caption",
    "classify_colour",
    "combos",
    "observe",
    "render",
    "sample_batch",
    "sample_geometry",
    "to_frames",
    "to_model_range",
]
