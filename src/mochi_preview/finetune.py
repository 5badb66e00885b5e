"""Fine-tune Mochi on your clips: `python -m mochi_preview.finetune CONFIG [key=value ...]` (`mochi-finetune`).

CONFIG is a YAML or JSON file; each `key=value` override sets one setting (`section.key` inside a section, the value
read as YAML: `train.steps=500`, `lora.targets=[qkv_x,proj_x]`, `validation.prompts=["a cat"]`). Every setting is
checked before anything loads. The run: the clips under `data.folder` (videos with same-name .txt captions) are
encoded once into `output_dir/cache/`; a LoRA on the attention projections (or the whole DiT, `train.mode=full`) is
trained with flow matching in the normalised latent space; the trainer state is saved to `output_dir/trainer/` every
`train.checkpoint_every` steps, and running the same command again resumes exactly where it stopped. Validation videos
go to `output_dir/validation/`, LoRA snapshots to `output_dir/checkpoints/`, and the result to
`output_dir/lora.safetensors` (Genmo's native format; `export.diffusers=true` adds the diffusers/peft
`pytorch_lora_weights.safetensors`), or `output_dir/dit.safetensors` (and `transformer/`) for full fine-tuning.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import torch

from .files import write_atomic
from .geometry import MOCHI
from .lora import GENMO_TARGETS, TARGETS

DEFAULT_SIZE = {"width": 848, "height": 480, "num_frames": 37}  # Genmo's fine-tuner, for folders without defaults


@dataclass(frozen=True)
class DataSection:
    """The clips and the size they are trained at (None: the model folder's defaults, else 848x480, 37 frames)."""

    folder: str = ""
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None  # 6k + 1
    fps: float | None = 30.0  # clips are resampled to this rate (Genmo: 30); None keeps their own frames


@dataclass(frozen=True)
class TrainSection:
    """Optimisation (Genmo's fine-tuner defaults: AdamW lr 2e-4, 200 warm-up steps then cosine, batch 1)."""

    mode: str = "lora"  # or "full": every DiT parameter trained
    steps: int = 2000
    lr: float = 2e-4
    warmup: int = 200
    batch_size: int = 1
    weight_decay: float = 0.01
    grad_clip: float = 0.0  # max gradient norm; 0 disables (Genmo's default)
    caption_dropout: float = 0.1  # share of steps trained on the empty prompt
    sigma_shift: float = 1.0  # > 1 trains more on noisy levels
    sample_posterior: bool = True  # z ~ N(mean, exp(logvar)) per step, as Genmo; false trains on the mean
    gradient_checkpointing: bool = True
    fp8_base: bool = False  # LoRA on a frozen base stored in fp8 (per-channel scales): half the weights' memory
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 leaves torch's choice
    checkpoint_every: int = 200  # trainer state (and a LoRA snapshot) every N steps
    device: str = "auto"  # "auto" (cuda when there is one), "cpu", "cuda", "cuda:N"


@dataclass(frozen=True)
class LoraSection:
    """The adapter (Genmo's defaults: rank 16, alpha 16 on the four attention projections)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = GENMO_TARGETS


@dataclass(frozen=True)
class ValidationSection:
    """Videos generated from the current weights every N steps (none without prompts)."""

    prompts: tuple[str, ...] = ()
    every: int = 200
    num_inference_steps: int | None = None  # None: the model folder's default
    guidance_scale: float | None = None
    seed: int = 12345


@dataclass(frozen=True)
class ExportSection:
    """Extra output formats."""

    diffusers: bool = False  # also the diffusers/peft LoRA (or transformer/ folder for full fine-tuning)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run."""

    output_dir: str = ""
    model_dir: str | None = None  # None: the demo model shipped in the package
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    export: ExportSection = field(default_factory=ExportSection)


class ConfigError(ValueError):
    """Settings that cannot run; the message names every bad key and what would be valid."""


# ---- reading and checking the config -----------------------------------------------------------------------------


def _describe(hint) -> str:
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text", type(None): "null"}
    if get_origin(hint) is tuple:
        return "a list of text"
    return " or ".join(names[t] for t in get_args(hint)) if _is_union(hint) else names[hint]


def _is_union(hint) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _coerce(value, hint):
    """`value` as type `hint`, or raise ValueError. Numbers may come as text (YAML reads 1e-4 as text)."""
    for t in get_args(hint) if _is_union(hint) else (hint,):
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
        if t is float and not isinstance(value, bool) and isinstance(value, int | float | str):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
        if t is str and isinstance(value, str):
            return value
        if get_origin(t) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, list | tuple) and all(isinstance(v, str) for v in items):
                return tuple(v.strip() for v in items if v.strip())
    raise ValueError


def _build(cls, values, where: str, problems: list[str]):
    """A `cls` from a mapping; unknown keys and wrong types go to `problems` (named with their section)."""
    if not isinstance(values, dict):
        problems.append(f"{where or 'the config'} must be a mapping of settings; got {values!r}")
        return cls()
    hints, known = get_type_hints(cls), [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in known:
            problems.append(f"unknown setting {name!r}; known {'in ' + where if where else 'settings'}: {known}")
        elif isinstance(hints[key], type) and hints[key].__module__ == __name__:  # a section
            kwargs[key] = _build(hints[key], value, name, problems)
        else:
            try:
                kwargs[key] = _coerce(value, hints[key])
            except ValueError:
                problems.append(f"{name} must be {_describe(hints[key])}; got {value!r}")
    return cls(**kwargs)


def read_config(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """The config file (YAML or JSON) with `key=value` overrides applied; types checked (ranges: `check_config`)."""
    import yaml

    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config {path}: expected a .yaml, .yml or .json file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} cannot be read: {e}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} must hold a mapping of settings; got {type(values).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must be key=value (e.g. train.steps=500)")
        *sections, last = key.strip().split(".")
        target = values
        for s in sections:
            target = target.setdefault(s, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {s!r} is not a section")
        try:
            target[last] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            target[last] = raw
    problems: list[str] = []
    cfg = _build(FinetuneConfig, values, "", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def check_config(cfg: FinetuneConfig) -> list[str]:
    """Everything wrong with a typed config (ranges, folders, sizes), each naming its key; [] when it can run."""
    p, d, t, lo, v = [], cfg.data, cfg.train, cfg.lora, cfg.validation
    if not cfg.output_dir:
        p.append("output_dir is missing: the folder for the cache, checkpoints and results")
    if cfg.model_dir is not None and not Path(cfg.model_dir).is_dir():
        p.append(f"model_dir {cfg.model_dir!r} is not a folder")
    if not d.folder:
        p.append("data.folder is missing: a folder of videos with same-name .txt captions")
    elif not Path(d.folder).is_dir():
        p.append(f"data.folder {d.folder!r} is not a folder")
    if None not in (d.width, d.height, d.num_frames):
        names = {k: f"data.{k}" for k in ("num_frames", "height", "width")}
        p += MOCHI.problems(d.num_frames, d.height, d.width, names)
    if d.fps is not None and d.fps <= 0:
        p.append(f"data.fps must be positive or null; got {d.fps}")
    if t.mode not in ("lora", "full"):
        p.append(f"train.mode must be 'lora' or 'full'; got {t.mode!r}")
    elif t.mode == "full" and t.fp8_base:
        p.append("train.fp8_base is for LoRA training (a fp8 weight cannot be trained); set train.mode=lora")
    for name, value, low in (("steps", t.steps, 1), ("warmup", t.warmup, 0), ("batch_size", t.batch_size, 1),
                             ("checkpoint_every", t.checkpoint_every, 1), ("threads", t.threads, 0)):  # fmt: skip
        if value < low:
            p.append(f"train.{name} must be at least {low}; got {value}")
    if t.lr <= 0:
        p.append(f"train.lr must be positive; got {t.lr}")
    if t.weight_decay < 0 or t.grad_clip < 0:
        p.append(f"train.weight_decay and train.grad_clip must be >= 0; got {t.weight_decay}, {t.grad_clip}")
    if not 0 <= t.caption_dropout <= 1:
        p.append(f"train.caption_dropout must be within [0, 1]; got {t.caption_dropout}")
    if t.sigma_shift <= 0:
        p.append(f"train.sigma_shift must be positive (1 = no shift); got {t.sigma_shift}")
    if t.device != "auto":
        try:
            if torch.device(t.device).type == "cuda" and not torch.cuda.is_available():
                p.append(f"train.device is {t.device!r} but this machine has no CUDA GPU (use 'auto' or 'cpu')")
        except RuntimeError:
            p.append(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {t.device!r}")
    if lo.rank < 1:
        p.append(f"lora.rank must be at least 1; got {lo.rank}")
    if lo.alpha <= 0:
        p.append(f"lora.alpha must be positive; got {lo.alpha}")
    if not lo.targets or any(x not in TARGETS for x in lo.targets):
        p.append(f"lora.targets must be a non-empty list of {list(TARGETS)}; got {list(lo.targets)}")
    if v.every < 0 or (v.num_inference_steps is not None and v.num_inference_steps < 1):
        p.append(f"validation.every must be >= 0 (0: never) and num_inference_steps >= 1; got {v.every}, "
                 f"{v.num_inference_steps}")  # fmt: skip
    if v.guidance_scale is not None and v.guidance_scale < 0:
        p.append(f"validation.guidance_scale must be >= 0; got {v.guidance_scale}")
    return p


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fill what was left None from the model folder (checked first: `check_config`)."""
    from . import settings
    from .tiny import default_model_dir

    model_dir = Path(cfg.model_dir) if cfg.model_dir is not None else default_model_dir()
    defaults = settings.model_defaults(model_dir)
    own = (model_dir / settings.DEFAULTS_FILE).is_file()
    size = {k: getattr(defaults, k) if own else DEFAULT_SIZE[k] for k in DEFAULT_SIZE}
    data = replace(cfg.data, **{k: getattr(cfg.data, k) or size[k] for k in size})
    steps = cfg.validation.num_inference_steps or defaults.num_inference_steps
    scale = cfg.validation.guidance_scale if cfg.validation.guidance_scale is not None else defaults.guidance_scale
    validation = replace(cfg.validation, num_inference_steps=steps, guidance_scale=scale)
    return replace(cfg, model_dir=str(model_dir), data=data, validation=validation)


def load_and_check(path: str | Path, overrides: list[str] = ()) -> FinetuneConfig:
    """Read, check and resolve a config; a ConfigError names every problem before any work."""
    cfg = read_config(path, overrides)
    if problems := check_config(cfg):
        raise ConfigError("; ".join(problems))
    cfg = resolve(cfg)
    if problems := check_config(cfg) + _model_problems(Path(cfg.model_dir)):
        raise ConfigError("; ".join(problems))
    return cfg


def _model_problems(model_dir: Path) -> list[str]:
    from .pipeline import check_model_dir

    try:
        check_model_dir(model_dir)
    except FileNotFoundError as e:
        return [f"model_dir: {e}"]
    has_encoder = (model_dir / "encoder.safetensors").is_file() or (model_dir / "vae").is_dir()
    return [] if has_encoder else [f"model_dir {model_dir} has no VAE encoder (encoder.safetensors or vae/)"]


# ---- the run -----------------------------------------------------------------------------------------------------


def _device(cfg: FinetuneConfig) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def prepare_data(cfg: FinetuneConfig, log=print):
    """Encode the clips (or reuse the cache) -> (LatentData, PrepareReport)."""
    from .pipeline import find_text_encoder_dir
    from .text import TextEncoder
    from .train.data import ClipSpec, load_cache, prepare
    from .vae import LATENTS_MEAN, LATENTS_STD, load_latent_stats, load_vae_encoder

    model_dir, device = Path(cfg.model_dir), _device(cfg)

    def load_models():
        mean, std = load_latent_stats(model_dir) or (LATENTS_MEAN, LATENTS_STD)
        encoder = load_vae_encoder(model_dir, device=device).eval()
        text = TextEncoder.from_folder(find_text_encoder_dir(model_dir), device=device)
        return encoder, text, torch.tensor(mean), torch.tensor(std), device

    d = cfg.data
    spec = ClipSpec(d.width, d.height, d.num_frames, d.fps)
    cache = Path(cfg.output_dir) / "cache"
    report = prepare(d.folder, cache, spec, load_models, str(model_dir.resolve()), log)
    log(f"data: {len(report.encoded)} clips encoded, {len(report.reused)} reused, {len(report.skipped)} skipped")
    data = load_cache(report.files)
    return data, report


def make_trainer(cfg: FinetuneConfig, data):
    """The DiT (from model_dir, on the device) with its trainer: LoraTrainer or, for mode full, DiTTrainer."""
    from .dit import load_dit
    from .train.dit import DiTTrainConfig, DiTTrainer
    from .train.lora import LoraTrainConfig, LoraTrainer

    t, device = cfg.train, _device(cfg)
    # A frozen base may stay bf16 on a GPU under autocast; trained weights are fp32 (AdamW's master copy).
    dtype = torch.bfloat16 if t.mode == "lora" and device.type == "cuda" else torch.float32
    dit = load_dit(cfg.model_dir, dtype=dtype, device=device, fp8="channel" if t.fp8_base else None)
    dit.gradient_checkpointing = t.gradient_checkpointing
    common = dict(
        steps=t.steps, lr=t.lr, warmup=t.warmup, weight_decay=t.weight_decay, betas=(0.9, 0.999),
        grad_clip=t.grad_clip, ema_decay=0.0, seed=t.seed, threads=t.threads, checkpoint_every=t.checkpoint_every,
        batch_size=t.batch_size, caption_dropout=t.caption_dropout, sigma_shift=t.sigma_shift,
        sample_posterior=t.sample_posterior,
    )  # fmt: skip
    if t.mode == "full":
        return DiTTrainer(dit.requires_grad_(True).train(), data, DiTTrainConfig(**common))
    lora = cfg.lora
    return LoraTrainer(dit.train(), data, LoraTrainConfig(rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
                                                          **common))  # fmt: skip


class Validator:
    """Videos from the current weights: the pipeline of the model folder around the DiT being trained."""

    def __init__(self, cfg: FinetuneConfig, dit):
        self.cfg, self.dit, self.pipe = cfg, dit, None

    @torch.no_grad()
    def __call__(self, step: int) -> list[Path]:
        from .pipeline import MochiPipeline
        from .video import encode_video

        v, d = self.cfg.validation, self.cfg.data
        if self.pipe is None:  # "resident": the trained weights never leave their device
            self.pipe = MochiPipeline.from_pretrained(self.cfg.model_dir, transformer=self.dit, memory="resident",
                                                      device=_device(self.cfg), torch_dtype=torch.float32)  # fmt: skip
        was_training = self.dit.training
        paths = []
        for i, prompt in enumerate(v.prompts):
            g = torch.Generator().manual_seed(v.seed + i)
            frames = self.pipe(prompt, height=d.height, width=d.width, num_frames=d.num_frames, generator=g,
                               num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                               output_type="np", progress=False).frames[0]  # fmt: skip
            path = Path(self.cfg.output_dir) / "validation" / f"step_{step:06d}" / f"{i:02d}.mp4"
            meta = {"prompt": prompt, "step": step}
            write_atomic(path, lambda tmp, f=frames, m=meta: encode_video(f, tmp, d.fps or 30.0, m), replace=True)
            paths.append(path)
        self.dit.train(was_training)
        return paths


def export(cfg: FinetuneConfig, trainer, folder: Path, final: bool) -> list[Path]:
    """The result (final) or a LoRA snapshot: native LoRA (+ diffusers/peft), or for full fine-tuning the DiT."""
    from .components import diffusers_dit_config, diffusers_dit_state
    from .dit import save_dit_native
    from .lora import save_lora_diffusers, save_lora_native

    written = []
    if cfg.train.mode == "lora":
        lora, rank, alpha = trainer.lora(), trainer.cfg.rank, trainer.cfg.alpha
        stem = "" if final else f"model_{trainer.step}."
        native = folder / ("lora.safetensors" if final else f"{stem}lora.safetensors")
        peft = folder / ("pytorch_lora_weights.safetensors" if final else f"{stem}peft.safetensors")
        if not native.exists():
            written.append(save_lora_native(native, lora, rank, alpha))
        if cfg.export.diffusers and not peft.exists():
            written.append(save_lora_diffusers(peft, lora, rank, alpha, len(trainer.model.blocks) - 1))
    elif final:  # full fine-tuning: the whole DiT, at the end only (tens of GB at the published size)
        native = folder / "dit.safetensors"
        if not native.exists():
            written.append(save_dit_native(native, trainer.model, dtype=torch.float32))
        if cfg.export.diffusers and not (folder / "transformer").exists():
            from safetensors.torch import save_file

            from .files import atomic_dir

            with atomic_dir(folder / "transformer") as tmp:
                save_file(diffusers_dit_state(trainer.model), str(tmp / "diffusion_pytorch_model.safetensors"))
                (tmp / "config.json").write_text(json.dumps(diffusers_dit_config(trainer.model.cfg), indent=1))
            written.append(folder / "transformer")
    return written


def run(cfg: FinetuneConfig, until: int | None = None, progress: bool = True, log=print) -> dict:
    """Preprocess, train (resuming `output_dir/trainer/` if there), validate and export; `until` stops early at that
    step with the state saved (the next run resumes). -> a summary dict."""
    start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(asdict(cfg), indent=1)
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(config_json), replace=True)
    data, report = prepare_data(cfg, log)
    clips = json.dumps([p.relative_to(out / "cache").as_posix() for p in report.files], indent=1)
    if (out / "trainer" / "state.json").exists() and (out / "clips.json").is_file():
        if (out / "clips.json").read_text() != clips:  # the checkpoint's batches were drawn from other clips
            warnings.warn(
                f"resuming {out / 'trainer'} with a different set of clips than it was trained on", stacklevel=2
            )
    write_atomic(out / "clips.json", lambda tmp: tmp.write_text(clips), replace=True)
    gc.collect()  # the VAE encoder and T5 are done with: their memory goes to training
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trainer = make_trainer(cfg, data)
    validate = Validator(cfg, trainer.model) if cfg.validation.prompts and cfg.validation.every else None

    def after_step(logs: dict) -> None:
        step = logs["step"]
        if validate is not None and step % cfg.validation.every == 0:
            validate(step)
        if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            export(cfg, trainer, out / "checkpoints", final=False)

    trainer.fit(until=until, checkpoint=out / "trainer", progress=progress, after_step=after_step)
    finished = trainer.step >= cfg.train.steps
    written = export(cfg, trainer, out, final=True) if finished else []
    summary = {
        "step": trainer.step,
        "finished": finished,
        "clips": len(data),
        "skipped": report.skipped,
        "written": [str(p) for p in written],
        "seconds": time.time() - start,
        "last_loss": trainer.history[-1]["loss"] if trainer.history else None,
    }
    log(f"step {trainer.step}/{cfg.train.steps}" + (f"; wrote {', '.join(map(str, written))}" if written else ""))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """`mochi-finetune CONFIG [key=value ...]`; exit status 2 with a message for a bad config."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        cfg = load_and_check(argv[0], argv[1:])
    except ConfigError as e:
        print(f"mochi-finetune: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(cfg)


if __name__ == "__main__":
    main()
