"""Generation settings: one table of every setting's names, type, default, valid range and help, checked in one place.

A setting has one name per surface, and this table is the only place the names are mapped:

    surface  example           used by
    api      guidance_scale    `MochiPipeline.__call__`'s keywords and `Settings`' fields (diffusers' names)
    cli      --cfg_scale       the command line's flags (the model card's; dashes and all)
    file     cfg_scale         sweep-file lines, JSON sidecars and a model folder's `mochi_defaults.json`
    ui       CFG scale         the web UI's form labels

The CLI's flags, the UI's form, the sweep/sidecar keys and every error message are derived from `SETTINGS`, so a new
setting (a LoRA, an input image, a cache option...) is one new row here. `Settings(...).check(surface)` checks a whole
request at once, naming each bad value the way that surface calls it, so callers can check before loading weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from .geometry import MOCHI
from .sampling import SCHEDULES, schedule_sigmas

SURFACES = ("api", "cli", "file", "ui")
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit value
DEFAULTS_FILE = "mochi_defaults.json"  # a model folder's recommended settings, under the file names
DEFAULT_PROMPT = (
    "A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl filled with lemons and sprigs of "
    "mint against a peach-colored background. The hand gently tosses the lemon up and catches it, showcasing its "
    "smooth texture. A beige string bag sits beside the bowl, adding a rustic touch to the scene. Additional lemons, "
    "one halved, are scattered around the base of the bowl. The even lighting enhances the vibrant colors and "
    "creates a fresh, inviting atmosphere."
)


@dataclass(frozen=True, eq=False)
class Setting:
    """One row of the table: a setting's names on every surface, its type, default, valid range and help."""

    api: str  # the pipeline's keyword and the `Settings` field (diffusers' name)
    file: str  # the sweep-file / sidecar / mochi_defaults.json key; the CLI flag is `--<file>` unless `flags` says
    kind: type  # str, int or float
    default: Any
    label: str  # the web UI's label
    help: str  # the CLI's help (the default is appended) and the UI's hint
    minimum: float | None = None
    maximum: float | None = None
    hint: str = ""  # appended to a range error, e.g. what typical values are
    optional: bool = False  # None is allowed (its meaning is in `help`)
    flags: tuple[str, ...] = ()  # the CLI's spellings, the first one used in messages; default (`--<file>`,)
    shown_default: str | None = None  # the default as the CLI's help shows it, when repr() is not helpful
    ui_group: str = "main"  # the form's row or section: main, size, seed, sampling, advanced
    ui: Mapping[str, Any] = field(default_factory=dict)  # extra arguments for the UI's input component
    pipeline: bool = True  # passed to `MochiPipeline.__call__` (future rows, e.g. output options, may not be)
    choices: tuple[str, ...] = ()  # the valid values of a text setting that is one of a few words
    digest_at_default: bool = True  # False for rows added later: at their default they leave sweep digests as before
    open_bound: str = ""  # "minimum" or "maximum": that bound itself is not valid, e.g. strength in (0, 1]
    parse: Callable[[Any], object] | None = None  # a further check of a value: raises ValueError saying what is valid

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or (f"--{self.file}",)

    def name(self, surface: str) -> str:
        """What `surface` ("api", "cli", "file" or "ui") calls this setting."""
        if surface not in SURFACES:
            raise ValueError(f"surface must be one of {SURFACES}; got {surface!r}")
        return {"api": self.api, "cli": self.cli_flags[0], "file": self.file, "ui": self.label}[surface]

    def cli_help(self, default: Any = None) -> str:
        """The flag's help, ending with `default` (that of the model the command will use), else the table's."""
        if default is None or default == self.default:
            default = self.shown_default if self.shown_default is not None else self.default
        elif self.kind is str:
            default = repr(default)
        return f"{self.help} (default: {default})"


SETTINGS: tuple[Setting, ...] = (
    Setting("prompt", "prompt", str, DEFAULT_PROMPT, "Prompt", "what the video shows",
            shown_default="the model card's lemon prompt", ui=dict(lines=4)),
    Setting("negative_prompt", "negative_prompt", str, "", "Negative prompt",
            'what to steer away from; "" means no text', shown_default='""', ui=dict(placeholder="(none)")),
    Setting("width", "width", int, 848, "Width", "pixels, a multiple of 16", ui_group="size",
            ui=dict(precision=0, step=16, info="multiple of 16")),
    Setting("height", "height", int, 480, "Height", "pixels, a multiple of 16", ui_group="size",
            ui=dict(precision=0, step=16, info="multiple of 16")),
    Setting("num_frames", "num_frames", int, 163, "Frames", "6k+1 frames, e.g. 31, 85, 163", ui_group="size",
            ui=dict(precision=0, step=6, info="6k+1")),
    Setting("seed", "seed", int, 1710977262, "Seed", "noise seed; the same seed gives the same video",
            minimum=0, maximum=SEED_MAX, optional=True, ui_group="seed", ui=dict(precision=0)),
    Setting("guidance_scale", "cfg_scale", float, 6.0, "CFG scale", "classifier-free guidance scale",
            minimum=0.0, maximum=50.0, hint=" (1 = no guidance, 4.5-6 typical)", ui_group="sampling",
            ui=dict(step=0.5, info="1 = no guidance")),
    Setting("num_inference_steps", "num_steps", int, 64, "Steps", "sampling steps", minimum=1, maximum=1000,
            ui_group="sampling", ui=dict(precision=0)),
    Setting("threshold_noise", "threshold_noise", float, 0.025, "Threshold noise",
            "noise level where the schedule turns from linear to quadratic", minimum=0.0, maximum=1.0,
            flags=("--threshold-noise", "--threshold_noise"), ui_group="advanced", ui=dict(step=0.005)),
    Setting("linear_steps", "linear_steps", int, None, "Linear steps", "steps in the linear part of the schedule",
            optional=True, flags=("--linear-steps", "--linear_steps"), shown_default="half the steps",
            ui_group="advanced", ui=dict(precision=0, info="empty: half the steps")),
    Setting("noise", "noise", str, "cpu", "Noise",
            "initial noise: cpu (a seeded CPU generator: the same video on any device, as diffusers with a CPU "
            "generator) or genmo (torch.manual_seed, then the sampling device's global generator, as Genmo's scripts: "
            "a seed gives their video on the same GPU)", choices=("cpu", "genmo"), digest_at_default=False,
            ui_group="advanced"),
    Setting("schedule", "schedule", str, "linear_quadratic", "Schedule",
            "the sigma schedule: linear_quadratic (Mochi's) or pcm_linear_quadratic (FastMochi's; --preset fast)",
            choices=SCHEDULES, ui_group="advanced", digest_at_default=False),
    Setting("cache", "cache", str, None, "Step cache",
            "reuse DiT work between steps: teacache[:THRESHOLD] or first_block[:THRESHOLD] (faster, slightly "
            "different video; off by default)", optional=True, shown_default="off", ui_group="advanced",
            parse=lambda v: _parse_cache(v), digest_at_default=False),
    Setting("image", "image", str, None, "Image", "an image file for the first frame (image to video); resized and "
            "centre-cropped to the video size", optional=True, shown_default="none", ui_group="input",
            digest_at_default=False),
    Setting("video", "init_video", str, None, "Input video", "a video file to redraw (video to video) with "
            "--strength; its size and frame count are used unless given", optional=True, shown_default="none",
            ui_group="input", digest_at_default=False),
    Setting("strength", "strength", float, 0.7, "Strength", "video to video: the noise level sampling starts "
            "from; 1 ignores the input video, 0.3 keeps most of it", minimum=0.0, maximum=1.0, open_bound="minimum",
            ui_group="input", ui=dict(step=0.05), digest_at_default=False),
    Setting("extend", "extend", str, None, "Video to extend", "a video file to continue: its last 7 frames start "
            "a new generation of --num_frames frames (those 7 included); the output is the video followed by the "
            "new frames", optional=True, shown_default="none", ui_group="input", digest_at_default=False),
    Setting("image_mode", "image_mode", str, "replace", "Image mode",
            "how the image (or the extended video's end) holds the first latent frames: replace (put back on its "
            "noising path after each step) or guide (a softer, halfway velocity correction toward it)",
            choices=("replace", "guide"),
            ui_group="input", digest_at_default=False),
    Setting("image_release", "image_release", float, 0.0, "Image release",
            "the fraction of the last steps in which the anchored frames are left free", minimum=0.0, maximum=1.0,
            open_bound="maximum", ui_group="input", ui=dict(step=0.05), digest_at_default=False),
    Setting("noise_multiplier", "noise_multiplier", float, 0.0, "Noise multiplier",
            "Pusa models: the conditioning frames' noise level as a fraction of the schedule's (0 keeps them clean; "
            "0.2-0.4 gives more motion)", minimum=0.0, maximum=1.0, ui_group="input", ui=dict(step=0.05),
            digest_at_default=False),
)  # fmt: skip
PIXEL_INPUTS = ("image", "video", "extend")  # at most one per request
BY_API: dict[str, Setting] = {s.api: s for s in SETTINGS}
BY_FILE: dict[str, Setting] = {s.file: s for s in SETTINGS}


def name(api: str, surface: str) -> str:
    """What `surface` calls the setting whose API name is `api` (e.g. name("guidance_scale", "cli") = "--cfg_scale")."""
    return BY_API[api].name(surface)


def _default(api: str) -> Any:
    return BY_API[api].default


@dataclass(frozen=True)
class Settings:
    """One generation's settings under the pipeline's (diffusers') names; defaults are the model card's CLI ones.

    `seed=None` means "draw a random seed" (the pipeline reports the one it drew). `prompt` and `negative_prompt`
    may be lists (a batch) and `guidance_scale` one value per step, as the pipeline accepts. A custom sigma
    schedule is not a setting: check it on its own and pass num_inference_steps=len(sigmas) - 1 here.
    """

    prompt: str | Sequence[str] = _default("prompt")
    negative_prompt: str | Sequence[str] = _default("negative_prompt")
    width: int = _default("width")
    height: int = _default("height")
    num_frames: int = _default("num_frames")
    seed: int | None = _default("seed")
    guidance_scale: float | Sequence[float] = _default("guidance_scale")
    num_inference_steps: int = _default("num_inference_steps")
    threshold_noise: float = _default("threshold_noise")
    linear_steps: int | None = _default("linear_steps")
    noise: str = _default("noise")
    schedule: str = _default("schedule")
    cache: str | None = _default("cache")
    image: str | None = _default("image")
    video: str | None = _default("video")
    strength: float = _default("strength")
    extend: str | None = _default("extend")
    image_mode: str = _default("image_mode")
    image_release: float = _default("image_release")
    noise_multiplier: float = _default("noise_multiplier")

    # ---- checking ------------------------------------------------------------------------------------------

    def problems(self, surface: str = "api") -> list[str]:
        """Everything wrong with these settings, each naming the setting as `surface` calls it; [] when valid."""
        names = {s.api: s.name(surface) for s in SETTINGS}
        problems, typed = [], set()
        for s in SETTINGS:
            value = getattr(self, s.api)
            if (problem := _type_problem(s, value, names[s.api])) is not None:
                problems.append(problem)
                continue
            typed.add(s.api)
            if s.choices and value not in s.choices:
                problems.append(f"{names[s.api]} must be one of {', '.join(s.choices)}; got {value!r}")
            if s.parse is not None and value is not None:
                try:
                    s.parse(value)
                except ValueError as e:
                    problems.append(f"{names[s.api]}: {e}")
            if value is None or s.kind is str:
                continue
            for v in value if isinstance(value, Sequence) else [value]:  # guidance_scale: one value per step
                low = s.minimum is not None and (v < s.minimum or (s.open_bound == "minimum" and v == s.minimum))
                high = s.maximum is not None and (v > s.maximum or (s.open_bound == "maximum" and v == s.maximum))
                if low or high:
                    problems.append(f"{names[s.api]} must be {_range(s)}{s.hint}; got {value}")
                    break
        if {"num_frames", "height", "width"} <= typed:
            # the size's problems go first, in the order the video is described: frames, height, width
            problems[:0] = MOCHI.problems(self.num_frames, self.height, self.width, names=names)
        if len(inputs := [names[k] for k in PIXEL_INPUTS if getattr(self, k) is not None]) > 1:
            problems.append(f"{' and '.join(inputs)} were both given; use one input (an image, a video to redraw, "
                            "or a video to extend)")  # fmt: skip
        steps = self.num_inference_steps if "num_inference_steps" in typed else None
        if steps is not None and 1 < steps and "linear_steps" in typed and self.linear_steps is not None:
            if not 1 <= self.linear_steps <= steps - 1:
                problems.append(
                    f"{names['linear_steps']} must be in [1, {steps - 1}] for {steps} steps "
                    f"({names['num_inference_steps']}); got {self.linear_steps}"
                )
        scale = self.guidance_scale
        if steps is not None and "guidance_scale" in typed and isinstance(scale, Sequence) and len(scale) != steps:
            problems.append(
                f"{names['guidance_scale']} has {len(scale)} values but {names['num_inference_steps']} is {steps}: "
                "give one value, or one per step"
            )
        return problems

    def check(self, surface: str = "api") -> Settings:
        """Raise ValueError naming every bad setting as `surface` ("api", "cli", "file", "ui") calls it; else self."""
        if problems := self.problems(surface):
            raise ValueError("; ".join(problems))
        return self

    # ---- derived values ------------------------------------------------------------------------------------

    @property
    def sigmas(self) -> list[float]:
        """The sigma schedule: num_inference_steps + 1 values from 1.0 down to 0.0."""
        return schedule_sigmas(self.schedule, self.num_inference_steps, self.threshold_noise, self.linear_steps)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `MochiPipeline.__call__` for these settings: `pipe(**s.pipeline_kwargs())`."""
        return {s.api: getattr(self, s.api) for s in SETTINGS if s.pipeline}

    def to_file(self) -> dict[str, Any]:
        """The settings under the file names (sweep lines, sidecars), in the table's order."""
        return {s.file: getattr(self, s.api) for s in SETTINGS}

    def digest(self) -> str:
        """A short hash of the settings (under the file names, so it is stable across renames of the API; rows
        added later count only away from their default, so a sweep's finished lines keep their names)."""
        values = {s.file: getattr(self, s.api) for s in SETTINGS}
        values = {k: v for k, v in values.items() if BY_FILE[k].digest_at_default or v != BY_FILE[k].default}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]

    # ---- reading -------------------------------------------------------------------------------------------

    def updated(self, values: Mapping[str, Any], surface: str = "file", where: str = "") -> Settings:
        """These settings with `values` (keyed by the file names) applied; whole floats become ints for int
        settings. Unknown keys and values of the wrong type raise ValueError, prefixed with `where` (a file name)."""
        prefix = f"{where}: " if where else ""
        if not isinstance(values, Mapping):
            raise ValueError(f"{prefix}expected a JSON object of settings; got {type(values).__name__}")
        if unknown := sorted(set(values) - set(BY_FILE)):
            raise ValueError(f"{prefix}unknown keys {unknown}; valid: {sorted(BY_FILE)}")
        try:
            return replace(self, **{BY_FILE[k].api: coerce(BY_FILE[k], v, surface) for k, v in values.items()})
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None


def _range(s: Setting) -> str:
    if s.open_bound:
        left, right = "(" if s.open_bound == "minimum" else "[", ")" if s.open_bound == "maximum" else "]"
        return f"in {left}{_show(s.minimum)}, {_show(s.maximum)}{right}"
    return f"between {_show(s.minimum)} and {_show(s.maximum)}"


def _parse_cache(spec: str):
    from .cache import parse_cache_spec  # the step caches import the DiT: only when a cache is asked for

    return parse_cache_spec(spec)


def _show(bound: float | None) -> str:
    return "2**64 - 1" if bound == SEED_MAX else f"{bound:g}"


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _type_problem(s: Setting, value: Any, shown: str) -> str | None:
    """Why `value` is not of setting `s`'s type, or None."""
    if value is None:
        return None if s.optional else f"{shown} is missing"
    if s.kind is str:
        batch = isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value)
        return None if isinstance(value, str) or batch else f"{shown} must be text; got {value!r}"
    values = value if s.api == "guidance_scale" and isinstance(value, list | tuple) and value else [value]
    for v in values:
        if s.kind is int and not _is_int(v):
            return f"{shown} must be a whole number; got {v!r}"
        if s.kind is float and not _is_number(v):
            return f"{shown} must be a finite number; got {v!r}"
    return None


def coerce(s: Setting, value: Any, surface: str) -> Any:
    """A value as typed in a form or file, as setting `s`'s type: whole floats -> int, empty -> None where optional.

    Fractions for int settings, text for numbers and non-finite numbers are refused (ValueError), never rounded.
    """
    shown = s.name(surface)
    if s.kind is str:
        if s.optional and (value is None or value == ""):  # an empty textbox or file field: none given
            return None
        if value is None and surface == "ui":  # an empty textbox
            return ""
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        if s.optional:
            return None
        raise ValueError(f"{shown} is empty; enter a number")
    if isinstance(value, str) and surface == "ui":
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{shown} must be a number; got {value!r}") from None
    if not _is_number(value):
        what = "a whole number" if s.kind is int else "a finite number"
        raise ValueError(f"{shown} must be {what}; got {value!r}")
    if s.kind is int:
        if not _is_int(value):
            if value != int(value):
                raise ValueError(f"{shown} must be a whole number; got {value!r}")
            value = int(value)
        return int(value)
    return value


def model_defaults(model_dir: str | Path | None, base: Settings | None = None) -> Settings:
    """`base` (default: the table's defaults) with a model folder's `mochi_defaults.json` applied, checked.

    The file holds file-named settings (e.g. {"width": 64, "num_steps": 24, "cfg_scale": 4.5}); a missing file means
    no changes; an unknown key, a wrong type or an invalid value raises ValueError naming the file and the key.
    """
    base = base or Settings()
    path = Path(model_dir) / DEFAULTS_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return base
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    settings = base.updated(values, "file", where=str(path))
    try:
        return settings.check("file")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def add_arguments(parser, defaults: Settings | None = None) -> None:
    """Add every setting's CLI flags to an argparse parser; each defaults to None (= not given), dest = file name.
    The help shows `defaults` (the settings the command will use: the model folder's), else the table's."""
    for s in SETTINGS:
        shown = getattr(defaults, s.api) if defaults is not None else None
        kind = {int: _cli_int, float: _cli_float}.get(s.kind, s.kind)
        parser.add_argument(
            *s.cli_flags, dest=s.file, type=kind, default=None, choices=s.choices or None, help=s.cli_help(shown)
        )


def _cli_int(text: str) -> int:
    """A flag's whole number; a fraction is refused (argparse names the flag)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None


def _cli_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}")
    return value


def from_arguments(args, base: Settings) -> Settings:
    """`base` with the settings given on the command line (parsed by a parser with `add_arguments`) applied."""
    given = {s.file: getattr(args, s.file) for s in SETTINGS if getattr(args, s.file, None) is not None}
    return base.updated(given, "cli")


assert [f.name for f in fields(Settings)] == [s.api for s in SETTINGS], "Settings' fields must follow SETTINGS"
