"""MochiPipeline: prompt -> T5 -> Euler/CFG sampling with the DiT -> VAE decode -> frames.

`pipe(prompt, ...)` takes diffusers' `MochiPipeline.__call__` arguments with their meaning (an argument left None
takes the model folder's default, `pipe.defaults`), plus our own (`seed`, `noise`, `sigmas`, `dit_hook`...). It is
three steps, each callable on its own:

    request = pipe.prepare(prompt, ...)  # check the settings, draw the initial noise, encode the prompts
    latents = pipe.sample(request)       # the Euler/CFG loop with the DiT (sampling.denoise)
    frames = pipe.decode(latents)        # the VAE decoder, then frames in [0, 1]

Pixel inputs (`conditioning.py`): `pipe(prompt, image=...)` holds the first latent frame on the image, `video=...,
strength=S` redraws a video from noise level S, `extend=...` continues one; `prepare` reads, checks and encodes them
(the VAE encoder, loaded at first use, on the device only while it encodes) before the prompts. A Pusa V0.5 folder
(`pusa.py`) conditions its per-frame sigmas instead.

Hooks: `callback_on_step_end(pipe, i, t, {"latents": z, ...})` runs after each step (t: diffusers' timestep of the
step, `pipe.scheduler.timesteps[i]`) and may return new "latents", "prompt_embeds" or "negative_prompt_embeds" (used
from the next step on); setting `pipe._interrupt = True` stops after the step and decodes what there is.
`dit_hook(call)` wraps each DiT call (a `sampling.DiTCall`) and returns its velocity: it may count calls, return a
cached velocity instead of running the DiT, or run it on edited inputs.

Memory modes (`set_memory_mode`; the machinery is in `offload.py`): loading puts nothing on the device; each
component goes where the mode wants it once the mode is known. "auto" (the default) picks, at each generation, the
first of resident / model offload / sequential offload that fits the device's free memory; "resident" keeps
everything on the device; `enable_model_cpu_offload()` keeps each component on the CPU and copies it to the device
only while it runs; `enable_sequential_cpu_offload()` also streams the DiT's blocks that do not fit (and T5's); CFG
branches are batched when memory allows (`batch_cfg="auto"`); `enable_vae_tiling()` decodes in tiles and time chunks.
Several processes: `enable_context_parallel()` (or `from_pretrained(..., context_parallel=True)` under torchrun) makes
every rank of a process group work on each video (see `distributed.py`).

Where diffusers' MochiPipeline differs from Genmo's reference, Genmo's numbers win: "" is encoded as no text at all
(`force_zeros_for_empty_prompt=True`), T5 and the VAE decoder run in fp32 whatever `torch_dtype` says (the DiT's
dtype), the VAE decodes as Genmo's decoder does, and with several prompts and `num_videos_per_prompt` > 1 each video
keeps its own prompt's mask.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import conditioning as pixels_in
from . import pusa, verify
from .cache import make_cache_hook, parse_cache_spec
from .components import MochiScheduler, MochiVAE, TupleOutput, VideoProcessor
from .dit import AsymmDiT, load_dit
from .geometry import MOCHI
from .lora import LoraMixin
from .offload import (
    NAMES,
    DeviceMemory,
    Footprint,
    Mover,
    Plan,
    check_batch_cfg,
    check_mode,
    choose,
    footprint,
    next_mode_advice,
)
from .sampling import DiTCall, DiTHook, TextCondition, check_sigmas, denoise, get_noise
from .settings import Settings, model_defaults
from .text import HUB_ID as T5_HUB_ID
from .text import TextEncoder, resolve_t5
from .tiny import DEMO_MODEL_DIR
from .vae import denormalize_latents, load_latent_stats, load_vae_decoder, load_vae_encoder
from .vae.decode import decode as vae_decode
from .vae.decode import describe_vae_options, smaller_vae_options
from .vae.layout import diffusers_vae_config, diffusers_vae_problems, has_vae_part, to_diffusers_state

VIDEO_TYPES = ("np", "pt", "pil")  # what `decode` makes
OUTPUT_TYPES = (*VIDEO_TYPES, "latent")
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")
SEED_BITS = 53  # random seeds stay exact as JSON numbers read by JavaScript (the web UI) and as float64
# diffusers' MochiPipeline.__call__ defaults: what a model folder without a mochi_defaults.json generates
API_DEFAULTS = Settings(num_frames=19, guidance_scale=4.5, seed=None)
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIXEL_INPUTS = pixels_in.INPUTS  # image=, video=, extend=: objects or paths, not settings of `pipe.defaults`
SETTING_ARGUMENTS = [name for name in Settings.__dataclass_fields__ if name not in ("prompt", *PIXEL_INPUTS)]


class NonFiniteLatentsError(RuntimeError):
    """The sampler produced NaN or inf: nothing is decoded or written."""


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory; the message suggests the memory modes that would fit."""


class DecodeMemoryError(DeviceMemoryError):
    """The VAE decode ran out of memory, and again with a smaller plan. Nothing is lost: `latents` holds the DiT's
    finished latents (on the CPU; the CLI and the web UI write them to a file that `--decode_latents` decodes), and
    `attempts` the decode options tried."""

    def __init__(
        self, reason: str, latents: torch.Tensor, attempts: list[dict], kept: str = "DecodeMemoryError.latents"
    ):
        super().__init__(f"{reason}. The finished latents are kept in {kept}")
        self.reason, self.latents, self.attempts, self.kept = reason, latents, attempts, kept


@dataclass
class MochiOutput(TupleOutput):
    """Videos: `frames[0]` is the first video; `out[0]`, `out["frames"]` and `out.to_tuple()` as in diffusers.

    `seed` made the initial noise: the one given, or the one drawn when neither a seed, a generator nor latents were
    given; None when the noise came from a generator or from given latents. `noise_device` is the device that drew
    it ("cpu", or a CUDA generator's "cuda:0": the same seed draws different noise there); None for given latents.
    """

    frames: object
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    noise_device: str | None = "cpu"
    memory: dict = field(default_factory=dict)  # the memory plan that ran (`Plan.record()`) and the bytes it moved
    batch_cfg: bool | None = None  # whether the CFG branches ran in one batch; None without CFG
    conditioning: dict | None = None  # what an image/video input did (its file, the notes, the anchoring); None: none
    cache: dict | None = None  # what a step cache computed and reused (`cache.StepCache.record()`); None: no cache
    _tuple_fields = ("frames",)


@dataclass(frozen=True)
class Request:
    """A checked generation request with its prompts encoded: what `prepare` makes and `sample` runs."""

    latents: torch.Tensor  # the initial noise (B, 12, T, H/8, W/8), fp32
    sigmas: list[float]  # num_steps + 1 noise levels, from 1 (pure noise) down to 0 (clean)
    guidance: list[float]  # one CFG scale per step (1.0 where guidance is off)
    cond: TextCondition  # the prompts, one row per video
    uncond: TextCondition | None  # the negative prompts; None when no step uses guidance
    seed: int | None  # see MochiOutput.seed
    noise_device: str | None = "cpu"  # see MochiOutput.noise_device
    conditioning: pixels_in.Conditioning | None = None  # an image/video input's steering (its latents are `latents`)
    per_frame: tuple[tuple[int, ...], float] | None = None  # Pusa: (conditioned latent frames, noise_multiplier)
    prefix: np.ndarray | None = None  # extension: the input video (T, H, W, 3) uint8 the new frames follow
    anchored_frames: int = 0  # extension: the generation's first frames that are the input's last ones


@dataclass
class _LoopText:
    """A sampling loop's prompt embeddings, which `callback_on_step_end` may replace between steps."""

    cond: TextCondition
    uncond: TextCondition | None
    replaced: bool = False

    def embeddings(self, key: str) -> torch.Tensor | None:
        text = self.cond if key == "prompt_embeds" else self.uncond
        return None if text is None else text.features

    def take(self, out: Mapping) -> None:
        """Use the "prompt_embeds" / "negative_prompt_embeds" a callback returned from the next step on. Under
        guidance, prompt_embeds may also be diffusers' loop batch: [negative; positive] rows."""
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            new, current = out.get(key), self.embeddings(key)
            if new is None:
                continue
            if current is None:
                raise ValueError(f"callback_on_step_end returned {key}, but this generation runs without guidance")
            shape, both = tuple(current.shape), (2 * current.shape[0], *current.shape[1:])
            diffusers_batch = key == "prompt_embeds" and self.uncond is not None
            if diffusers_batch and tuple(new.shape) == both:
                self.uncond = self._with(self.uncond, new.chunk(2)[0])
                new = new.chunk(2)[1]
            elif tuple(new.shape) != shape:
                also = f" (or {both}: diffusers' [negative; positive] batch)" if diffusers_batch else ""
                raise ValueError(
                    f"callback_on_step_end returned {key} shaped {tuple(new.shape)}; the loop's {key} are "
                    f"{shape}{also} (videos, tokens, width)"
                )
            if key == "prompt_embeds":
                self.cond = self._with(self.cond, new)
            else:
                self.uncond = self._with(self.uncond, new)
            self.replaced = True

    @staticmethod
    def _with(text: TextCondition, features: torch.Tensor) -> TextCondition:
        return TextCondition(features.to(text.features.device, text.features.dtype), text.mask)

    def hook(self, inner: DiTHook | None) -> DiTHook:
        """A dit_hook running each DiT call on the current embeddings, around `inner`."""

        def with_text(call: DiTCall) -> torch.Tensor:
            if self.replaced:
                texts = {"cond": self.cond, "uncond": self.uncond}
                text = texts[call.branch] if call.branch in texts else TextCondition.cat(self.cond, self.uncond)
                call = replace(call, text=text)
            return call() if inner is None else inner(call)

        return with_text


class _Interrupted(Exception):
    """Raised between steps once `pipe.interrupt` is set; carries the latents reached."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents


class MochiPipeline(LoraMixin):
    """Text-to-video with Mochi 1: `pipe(prompt).frames[0]`, diffusers' MochiPipeline API."""

    def __init__(
        self,
        dit: AsymmDiT,
        decoder: nn.Module,
        text_encoder: TextEncoder,
        device: str | torch.device | None = None,
        sources: dict | None = None,
        memory: str = "auto",
        mover: Mover | None = None,
        defaults: Settings = API_DEFAULTS,
        scheduler: MochiScheduler | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        """Nothing moves to `device` here: the memory mode (`set_memory_mode`) places each component."""
        self.dit, self.decoder, self.t5 = dit, decoder, text_encoder
        self.sources = sources or {}  # the files each component came from (recorded in output sidecars)
        self.defaults = defaults  # what an argument left None means (the folder's mochi_defaults.json)
        if scheduler is None:
            scheduler = MochiScheduler(defaults.threshold_noise, defaults.linear_steps)
            scheduler.set_timesteps(defaults.num_inference_steps)  # the default schedule until a call sets its own
        self.scheduler = scheduler
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.vae, self.video_processor = MochiVAE(self), VideoProcessor()
        self.vae_options: dict = {"mode": "auto"}
        self.cp = None  # a distributed.ContextParallel once enable_context_parallel() ran
        self.last_encode_tiles = (1, 1)  # the spatial tiles of the latest image/video encode
        self.vae_encoder: nn.Module | None = None  # loaded from the model folder at the first image/video input
        # The VAE's per-channel latent (mean, std); None: the published constants. Models trained here bring theirs.
        self.latent_stats: tuple[list[float], list[float]] | None = None
        parts = {  # what each stage puts on the device: (module, the blocks sequential offload streams)
            "text_encoder": lambda: (self.t5.model, _blocks(self.t5)),
            "dit": lambda: (self.dit, _blocks(self.dit)),
            "decoder": lambda: (self.decoder, None),
        }
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory = DeviceMemory(parts, mover if mover is not None else Mover(device))
        self.last_batch_cfg: bool | None = None  # how the latest sampling ran its CFG branches (None: no CFG)
        self._plan_key: tuple | None = None  # the request the plan in force was made for
        self._shown: str | None = None  # the plan line printed last
        self._progress_bar_config: dict = {}
        self._interrupt = False
        self.num_timesteps = 0
        self.set_memory_mode(memory)

    # ---- diffusers' attributes ----------------------------------------------------------------------------

    @property
    def transformer(self) -> AsymmDiT:
        return self.dit

    @property
    def text_encoder(self):
        """The T5 encoder (a transformers `T5EncoderModel`); None after `free_text_encoder()`."""
        return self.t5.model

    @property
    def tokenizer(self):
        return self.t5.tokenizer

    @property
    def components(self) -> dict:
        """The parts by diffusers' names; `MochiPipeline.from_pretrained(folder, **pipe.components)` reuses them."""
        return {name: getattr(self, name) for name in COMPONENTS}

    @property
    def dtype(self) -> torch.dtype:
        """The DiT's compute dtype (T5 and the VAE keep their own: `text_encoder.dtype`, `vae.dtype`)."""
        return self.dit.dtype

    @property
    def is_demo(self) -> bool:
        """Whether this is the small demo model shipped with the package."""
        folder = self.sources.get("model_dir")
        return folder is not None and Path(folder).resolve() == DEMO_MODEL_DIR.resolve()

    @property
    def is_pusa(self) -> bool:
        """Whether the DiT is Pusa V0.5 (per-frame sigmas: image to video and extension run its trained way)."""
        folder = self.sources.get("model_dir")
        return folder is not None and pusa.is_pusa_folder(folder)

    @property
    def interrupt(self) -> bool:
        """Set it (or diffusers' `_interrupt`) to stop a generation after the current step."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the sampling bar (e.g. disable=True), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        variant: str | None = None,
        device: str | torch.device | None = None,
        text_encoder_path: str | Path | None = None,
        text_encoder_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        attention_backend: str = "auto",
        attention_chunk: int | None = None,
        fp8: str | None = None,
        context_parallel: bool = False,
        cfg_parallel: bool | None = None,
        shard_dit: bool = False,
        memory: str = "auto",
        mover: Mover | None = None,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        transformer: AsymmDiT | None = None,
        vae: MochiVAE | nn.Module | None = None,
        text_encoder=None,
        tokenizer=None,
        scheduler: MochiScheduler | None = None,
        force_zeros_for_empty_prompt: bool = True,
        low_cpu_mem_usage: bool = True,
        verify_hashes: bool = False,
        device_map: str | dict | None = None,
        **unknown,
    ) -> MochiPipeline:
        """Load from a native folder (dit/decoder.safetensors + a T5 folder), a diffusers folder, or a Hub repo id
        already in the local Hugging Face cache (`cache_dir`, `revision`; nothing is downloaded: see
        `python -m mochi_preview.download`). Components load on the CPU; nothing goes to `device` until the memory
        mode places it (`memory`: "auto", "resident", "model", "sequential"; see `set_memory_mode`, which takes
        `mover` too). Out of device memory while placing the weights raises `DeviceMemoryError` with the mode to try.

        `torch_dtype` (or diffusers' newer name `dtype`): the DiT's dtype (default bfloat16); T5 and the VAE decoder
        stay fp32 as Genmo runs them, unless a dict per component ({"transformer": ..., "vae": ..., "text_encoder":
        ..., "default": ...}), `vae_dtype` or `text_encoder_dtype` say otherwise. `variant` ("bf16"): read each
        component's `*.bf16.*` weight files (a component without them falls back to its plain files, with a
        warning); a folder holding a single variant loads without it. Component overrides (`transformer=` an
        AsymmDiT, `vae=`, `text_encoder=`, `tokenizer=`, `scheduler=`, e.g. from `other.components`) are used as they
        are and not read from the folder. `force_zeros_for_empty_prompt` (default True, Genmo's rule): an empty
        prompt is no text at all; False keeps its EOS token, as diffusers does by default. `low_cpu_mem_usage` is
        always the case (tensors are read one at a time). `device_map` is refused: several GPUs work on each video
        with torchrun (context parallelism).

        `attention_backend`: "auto" (flash-attn on a GPU that has it, else PyTorch SDPA), "sdpa", "flash", "sage";
        `attention_chunk`: SDPA query rows per call (default: 4096 on CPU, one call on GPU).
        `fp8`: keep the DiT blocks' weights in float8 e4m3 (half of bf16): "tensor" / "channel" quantize while
        loading (per-tensor / per-channel scales), "checkpoint" keeps a fp8 checkpoint's own weights and scales.
        `context_parallel`: join torchrun's process group and generate with all its ranks (see
        `enable_context_parallel`); with `shard_dit`, each rank reads and keeps only its share of the DiT's blocks.
        A folder with a manifest (`mochi_manifest.json`, written by `python -m mochi_preview.download`) has its
        weight files' sizes checked before loading, and their SHA-256 with `verify_hashes=True`.
        """
        if unknown:
            accepted = [p for p in inspect.signature(cls.from_pretrained).parameters if p not in ("unknown",)]
            raise TypeError(
                f"from_pretrained() got unexpected keyword arguments {sorted(unknown)}; it accepts {accepted}"
            )
        if device_map is not None:
            raise ValueError(
                f"device_map={device_map!r} is not supported: to use several GPUs, run the script under "
                "`torchrun --nproc_per_node=N` with from_pretrained(..., context_parallel=True) (every GPU works on "
                "each video); on one GPU, enable_model_cpu_offload() or the default memory='auto' fits the memory"
            )
        dtypes = component_dtypes(torch_dtype, dtype, text_encoder_dtype, vae_dtype)
        check_overrides(transformer, vae, text_encoder, tokenizer, scheduler)
        memory = check_mode(memory)  # a typo, or a mode context parallelism cannot run, fails before the loading
        if context_parallel:
            from .distributed import check_compatible

            check_compatible(memory, True, shard_dit)
        folder = resolve_model_dir(pretrained_model_name_or_path, cache_dir, revision)
        given = {n for n, part in (("dit", transformer), ("vae", vae), ("t5", text_encoder)) if part is not None}
        check_model_dir(folder, text_encoder_path, given)
        for part in (folder, *([text_encoder_path] if text_encoder_path else [])):  # against their manifests
            if Path(part).is_dir():
                (verify.check_hashes if verify_hashes else verify.check_sizes)(part)
        defaults = model_defaults(folder, API_DEFAULTS)  # a bad defaults file fails before the weights load
        cp = None
        if context_parallel:
            from .distributed import ContextParallel, init_distributed

            device = init_distributed(device=device)  # the backend follows the device (gloo on a CPU)
            cp = ContextParallel(cfg_parallel=cfg_parallel, device=device)
            device = cp.device
        t5_dir = Path(text_encoder_path) if text_encoder_path else None
        with variant_view(folder, variant) as view, cp.guard() if cp is not None else nullcontext():
            if transformer is not None:
                dit = transformer
            elif shard_dit:
                from .distributed import load_dit_sharded

                if cp is None:
                    raise ValueError("shard_dit needs context_parallel=True (several processes to share the blocks)")
                dit = load_dit_sharded(
                    pusa.dit_file(view), cp, dtype=dtypes["transformer"], attention_backend=attention_backend, fp8=fp8
                )
            else:
                dit = load_dit(
                    pusa.dit_file(view), dtype=dtypes["transformer"], attention_backend=attention_backend, fp8=fp8
                )
            decoder = load_vae_decoder(view, dtype=dtypes["vae"]) if vae is None else getattr(vae, "decoder", vae)
            if isinstance(text_encoder, TextEncoder):
                text = text_encoder
            elif text_encoder is not None:
                text = TextEncoder(text_encoder, tokenizer or load_tokenizer(t5_dir or find_text_encoder_dir(view)))
            else:
                text = TextEncoder.from_folder(t5_dir or find_text_encoder_dir(view), dtype=dtypes["text_encoder"])
                text.tokenizer = tokenizer or text.tokenizer
        if text_encoder is None and t5_dir is None:
            t5_dir = find_text_encoder_dir(folder)
        dit.set_attention(attention_backend, attention_chunk)
        sources = {"model_dir": str(folder), "text_encoder": str(t5_dir) if t5_dir is not None else None}
        if variant is not None:
            sources["variant"] = variant
        pipe = cls(
            dit,
            decoder,
            text,
            device=device,
            sources=sources,
            mover=mover,
            defaults=defaults,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        )
        pipe.latent_stats = load_latent_stats(folder)
        if cp is not None:
            pipe._use_context_parallel(cp, shard_dit)  # a given transformer is sharded here (a loaded one already is)
        return pipe.set_memory_mode(memory)

    def save_pretrained(self, save_directory: str | Path, variant: str | None = None) -> Path:
        """Write the pipeline in diffusers' layout (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
        model_index.json), plus its mochi_defaults.json and latent_stats.json; weight files named for `variant`
        (e.g. "bf16": `*.bf16.safetensors`), in each component's dtype. The folder appears whole (an existing one is
        replaced). Everything is written from memory, whatever layout it was loaded from: the DiT as it is now (a
        fine-tuned or LoRA-fused one), the VAE as diffusers' `AutoencoderKLMochi` (decoder, and encoder when the
        pipeline has one: in use, or in its model folder) with its config.json and latent statistics."""
        from safetensors.torch import save_file

        from .components import (
            MODEL_INDEX,
            SCHEDULER_CONFIG,
            diffusers_dit_config,
            diffusers_dit_problems,
            diffusers_dit_state,
            variant_name,
        )
        from .files import atomic_dir
        from .settings import DEFAULTS_FILE

        if self.t5.model is None:
            raise RuntimeError("the text encoder was freed (free_text_encoder()); load the pipeline again to save it")
        state = diffusers_dit_state(self.dit)  # an fp8 DiT is refused before anything is written
        encoder = self._folder_encoder() if self.vae_encoder is None else self.vae_encoder
        encoder_config = encoder.config if encoder is not None else None
        stats = self.vae.config.latents_mean, self.vae.config.latents_std
        vae_config = diffusers_vae_config(self.decoder.config, encoder_config, *stats)
        problems = diffusers_dit_problems(self.dit.cfg) + diffusers_vae_problems(self.decoder.config, encoder_config)
        if problems:
            warnings.warn(
                f"{save_directory}: diffusers' MochiPipeline cannot load this model ({'; '.join(problems)}); "
                "MochiPipeline.from_pretrained here can",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
        if live := [n for n, a in self.loras.adapters.items() if a.active and n not in self.loras.fused]:
            warnings.warn(
                f"the LoRA adapters {live} are applied live and are not saved; fuse_lora() first to save them merged "
                "into the DiT's weights",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
        vae_state = to_diffusers_state(self.decoder.state_dict(), "decoder")
        if encoder is not None:
            vae_state |= to_diffusers_state(encoder.state_dict(), "encoder")
        with atomic_dir(save_directory, replace=True) as tmp:
            for name, tensors, config in (
                ("transformer", state, diffusers_dit_config(self.dit.cfg)),
                ("vae", vae_state, vae_config),
            ):
                (tmp / name).mkdir()
                file = variant_name("diffusion_pytorch_model.safetensors", variant)
                save_file(tensors, str(tmp / name / file), metadata={"format": "pt"})
                _write_json(tmp / name / "config.json", config)
            self.t5.model.save_pretrained(tmp / "text_encoder", variant=variant)
            self.t5.tokenizer.save_pretrained(tmp / "tokenizer")
            vocab = getattr(self.t5.tokenizer, "vocab_file", None)  # transformers 5 writes only tokenizer.json
            if vocab and Path(vocab).is_file() and not (tmp / "tokenizer" / "spiece.model").exists():
                shutil.copy(vocab, tmp / "tokenizer" / "spiece.model")
            (tmp / "scheduler").mkdir()
            _write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
            index = {**MODEL_INDEX, "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
            _write_json(tmp / "model_index.json", index)
            defaults = {k: v for k, v in self.defaults.to_file().items() if v != API_DEFAULTS.to_file()[k]}
            _write_json(tmp / DEFAULTS_FILE, {k: v for k, v in defaults.items() if k != "prompt"})
            if self.latent_stats is not None:
                mean, std = self.latent_stats
                _write_json(tmp / "latent_stats.json", {"mean": list(mean), "std": list(std)})
        return Path(save_directory)

    # ---- generation ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        num_videos_per_prompt: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str | None = None,
        return_dict: bool | None = None,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
        max_sequence_length: int | None = None,
        *,
        seed: int | None = None,
        noise: str | None = None,
        sigmas: Sequence[float] | None = None,
        threshold_noise: float | None = None,
        linear_steps: int | None = None,
        batch_cfg: bool | str | None = None,
        progress: bool | None = None,
        dit_hook: DiTHook | None = None,
        image=None,
        video=None,
        strength: float | None = None,
        extend=None,
        image_mode: str | None = None,
        image_release: float | None = None,
        noise_multiplier: float | None = None,
        schedule: str | None = None,
        cache: str | None = None,
    ) -> MochiOutput | tuple:
        """Generate videos: `prepare`, `sample`, then `decode`. Every argument left None takes its default: the model
        folder's (`pipe.defaults`), else diffusers' (19 frames of 848x480, 64 steps, guidance 4.5, "pil").

        diffusers' arguments keep diffusers' meaning: `prompt` (or `prompt_embeds` + `prompt_attention_mask`, from
        `encode_prompt`), a batch of prompts x `num_videos_per_prompt`, one `generator` or one per video, `latents`,
        guidance off at `guidance_scale` <= 1, `num_frames` that is not 6k+1 rounded down to one (with a warning, as
        diffusers' result), `timesteps` (1000 * (1 - sigma) per step), `output_type` "pil", "np" (B, T, H, W, 3)
        floats in [0, 1], "pt" (B, T, 3, H, W) or "latent" (the DiT's latents), `return_dict=False` for a tuple,
        `callback_on_step_end(pipe, i, t, kwargs)` with the tensors named in `callback_on_step_end_tensor_inputs`
        (the embeddings it returns are used from the next step on; prompt_embeds may also be diffusers' [negative;
        positive] batch).
        `attention_kwargs` is accepted and has no effect (there are no attention processors to pass it to).

        Ours: `seed` (else a random seed, recorded in the output), `noise` ("cpu": the seed's noise from a CPU
        generator, the same on any device and equal to diffusers with a CPU generator; "genmo": torch.manual_seed(seed)
        then the global generator of the pipeline's device, as Genmo's sampler draws it), `sigmas` (a schedule of its
        own), `threshold_noise` / `linear_steps` (the linear-quadratic schedule), `batch_cfg` (see `sample`),
        `progress` (the step bar and the memory plan line; `set_progress_bar_config(disable=True)` also silences
        the bar) and `dit_hook`. An autocast context around the call changes nothing: the pipeline keeps its own
        dtypes.

        Pixel inputs (one at most; see `conditioning.py`), each read and checked before any work:
        `image` (a PIL image, an (H, W, 3) array or a path) is the first frame: resized and centre-cropped to the
        video size (with a warning saying so), encoded by the VAE encoder and held as latent frame 0
        (`image_mode` "replace": put back on its own noising path after each step; "guide": a velocity correction
        halfway toward it each step, composed with `dit_hook`), released for the last `image_release` fraction of
        the steps.
        `video` (a file, a (T, H, W, 3) array or a list of PIL images) is redrawn from the noise level `strength`
        in (0, 1] (1 = text to video, 0.3 keeps most of it) on the schedule cut there; width, height and num_frames
        left None come from it (a count that is not 6k+1 is trimmed, with a warning). `extend` (a video) is
        continued: its last 7 frames (2 latent frames) anchor the first frames of a new generation of
        `num_frames` frames (those 7 included: num_frames=25 adds 18), and the output is the whole input followed
        by the new frames (output_type="latent": the new generation's latents). On a Pusa model image and extend
        condition its per-frame sigmas instead (`noise_multiplier`: the conditioning frames' noise, 0..1).
        `MochiOutput.conditioning` records what was done.
        """
        output_type = output_type or "pil"
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        inputs = tuple(callback_on_step_end_tensor_inputs or ("latents",))
        if bad := [k for k in inputs if k not in CALLBACK_TENSORS]:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {CALLBACK_TENSORS}; got {bad}")
        batch_cfg = check_batch_cfg("auto" if batch_cfg is None else batch_cfg)
        if attention_kwargs:
            warnings.warn(
                "attention_kwargs has no effect here (no attention processors)", stacklevel=_user_stacklevel()
            )
        progress = True if progress is None else progress
        per_frame = self.is_pusa and (image is not None or extend is not None)  # Pusa's per-frame sampler
        step_cache = self._step_cache(self.defaults.cache if cache is None else cache, dit_hook, per_frame)
        request_args = {k: v for k, v in locals().items() if k in REQUEST_ARGUMENTS}
        self._interrupt = False
        self.memory.ledger.new_generation()
        timings, peaks = {}, {}
        with _no_autocast(self.device):
            with self._stage("text", timings, peaks):
                request = self.prepare(**request_args)
            with self._stage("dit", timings, peaks):
                self._plan_request(request.latents.shape, request.uncond is not None, batch_cfg)
                self._announce(progress)
                hook = step_cache if step_cache is not None else dit_hook
                latents = self.sample(request, batch_cfg, callback_on_step_end, hook, progress, inputs)
            if output_type == "latent":
                frames = latents
            else:
                with self._stage("vae", timings, peaks):
                    frames = self.decode(latents, output_type, prefix=(request.prefix, request.anchored_frames))
        if return_dict is False:
            return (frames,)
        report = dict(memory=self.memory_record(), batch_cfg=self.last_batch_cfg)
        report["conditioning"] = self._conditioning_record(request)
        report["cache"] = step_cache.record() if step_cache is not None else None
        return MochiOutput(frames, request.seed, timings, peaks, noise_device=request.noise_device, **report)

    def _step_cache(self, spec: str | None, dit_hook: DiTHook | None, per_frame: bool = False):
        """A fresh step cache for one generation (`cache.make_cache_hook`), or None; checked before any work.
        Under context parallelism every rank takes the same decisions (the indicator is all-reduced); a sharded DiT
        and Pusa's per-frame sampling are refused."""
        if spec is None or parse_cache_spec(spec) is None:
            return None
        if dit_hook is not None:
            raise ValueError("give cache or dit_hook, not both (a step cache is a dit_hook)")
        if per_frame:
            raise ValueError(
                "cache does not combine with a Pusa model's image or extend conditioning (per-frame sigmas); "
                "drop cache, or the image/extend input"
            )
        from .distributed import is_sharded

        return make_cache_hook(spec, sharded_dit=is_sharded(self.dit))

    @torch.inference_mode()
    def prepare(self, prompt: str | list[str] | None = None, **request) -> Request:
        """Check a request, make its initial noise and encode its prompts (with the negative ones when guided).

        Takes `__call__`'s arguments that describe the video (not the output, callbacks or progress ones); None
        means the default. Everything is checked before any work. The noise: the given `latents`
        (B, 12, T, H/8, W/8), else from `generator` (one, or one per video; a CUDA generator draws on its device),
        else from `seed` (see `noise`), else from a random seed (reported as `Request.seed`). A generator on another
        device than the pipeline's is refused before the prompts are encoded.
        """
        if unknown := sorted(set(request) - REQUEST_ARGUMENTS):
            raise TypeError(f"prepare() got unexpected arguments {unknown}; it takes {sorted(REQUEST_ARGUMENTS)}")
        r = {name: request.get(name) for name in REQUEST_ARGUMENTS} | {"prompt": prompt}
        s, sigmas, pixels = self._settings(r)
        embeds, neg_embeds = r["prompt_embeds"], r["negative_prompt_embeds"]
        prompts = None if embeds is not None else ([s.prompt] if isinstance(s.prompt, str) else list(s.prompt))
        if self.is_demo and prompts:  # the demo model knows one small world: say so when a prompt is outside it
            from .demo.vocabulary import prompt_warning

            for message in dict.fromkeys(filter(None, map(prompt_warning, prompts))):
                warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())
        batch = len(prompts) if prompts is not None else embeds.shape[0]
        negative = s.negative_prompt
        negatives = [negative] * batch if isinstance(negative, str) else list(negative)
        if neg_embeds is None and len(negatives) != batch:
            raise ValueError(f"{batch} prompts but {len(negatives)} negative prompts (negative_prompt)")
        per_prompt = 1 if r["num_videos_per_prompt"] is None else r["num_videos_per_prompt"]
        scale = s.guidance_scale
        scales = [float(scale)] * (len(sigmas) - 1) if isinstance(scale, int | float) else [float(g) for g in scale]
        guidance = [g if g > 1.0 else 1.0 for g in scales]  # diffusers: guidance is off at a scale <= 1
        guided = any(g > 1.0 for g in guidance)
        seed = s.seed
        if self.cp is not None and seed is None and r["generator"] is None and r["latents"] is None:
            seed = self.cp.broadcast_object(secrets.randbits(SEED_BITS))  # every rank draws the same noise
        latents, seed, noise_device = initial_latents(
            batch * per_prompt,
            s.num_frames,
            s.height,
            s.width,
            seed,
            r["generator"],
            r["latents"],
            device=self.device,
            noise=s.noise,
        )
        conditioning = self._condition(pixels, s, latents, sigmas) if pixels is not None else None
        self._plan_request(latents.shape, guided, fresh=True)  # the memory plan for this size; weights placed
        length = r["max_sequence_length"] or self.t5.max_length
        text = self.encode_prompt(
            prompts,
            negatives,
            guided,
            prompt_embeds=embeds,
            negative_prompt_embeds=neg_embeds,
            prompt_attention_mask=r["prompt_attention_mask"],
            negative_prompt_attention_mask=r["negative_prompt_attention_mask"],
            max_sequence_length=length,
        )
        rows = lambda t: t.repeat_interleave(per_prompt, dim=0)  # noqa: E731  video j of prompt i: row i * n + j
        cond = TextCondition(rows(text[0]), rows(text[1]))
        uncond = TextCondition(rows(text[2]), rows(text[3])) if guided else None
        self.scheduler.set_timesteps(sigmas=sigmas, device=self.device)
        self.num_timesteps = len(sigmas) - 1
        request = Request(latents, sigmas, guidance, cond, uncond, seed=seed, noise_device=noise_device)
        return replace(request, **conditioning) if conditioning is not None else request

    def _condition(self, pixels: pixels_in.PixelInput, s: Settings, noise: torch.Tensor, sigmas: list[float]) -> dict:
        """Encode a fitted pixel input and make what it changes in the request (`Request`'s fields by name)."""
        extension = pixels.kind == "extend"
        x = self._encode_pixels(pixels_in.extension_frames(pixels.frames) if extension else pixels.frames)
        extra = {}
        if extension:
            extra = {"prefix": pixels.frames, "anchored_frames": pixels_in.MIN_VIDEO_FRAMES}
        if pixels.kind == "video":
            c = pixels_in.start_from(noise, x, s.strength, sigmas)
        elif self.is_pusa:
            task = "image_to_video" if pixels.kind == "image" else "extension"
            frames = pusa.conditioned_frames(task, noise.shape[2], x.shape[2])
            z = pusa.start_latents(noise, x, frames, sigmas[0], s.noise_multiplier)
            record = {"pusa": task, "conditioned_latent_frames": list(frames), "noise_multiplier": s.noise_multiplier}
            c = pixels_in.Conditioning(z, record=record)
            extra["per_frame"] = (frames, s.noise_multiplier)
        else:
            c = pixels_in.anchor(noise, x, sigmas, s.image_mode, s.image_release, pixels_in.GUIDE_STRENGTH)
        c.notes[:0] = pixels.notes
        c.record = {**pixels.source, **c.record}
        if self.last_encode_tiles != (1, 1):
            c.record["encode_tiles"] = list(self.last_encode_tiles)
        return {"latents": c.latents, "conditioning": c, **extra}

    def _encode_pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> normalised latents (1, 12, K, h, w) on the CPU, with the VAE encoder (loaded from
        the model folder at first use, fp32) on the device only while it encodes; in spatial tiles when the VAE
        options or the device's free memory ask for them (`last_encode_tiles`; one plan for every rank)."""
        if self.vae_encoder is None:
            self.vae_encoder = self._folder_encoder()
        encoder = self.vae_encoder
        budget = max(0, self.memory.budget() - self.memory.ledger.live)  # beside the weights on the device now
        budget = budget if self.cp is None else self.cp.agree_min(budget)
        tiles, overlap = pixels_in.encode_plan(encoder.config, frames.shape[:3], self.vae_options, budget)
        self.last_encode_tiles = tiles
        try:
            with self._memory_errors("vae encode"):
                return pixels_in.encode(encoder.to(self.device), frames, self.latent_stats, tiles, overlap)
        finally:
            encoder.to("cpu")
            release_memory(self.device)

    def _settings(self, r: dict) -> tuple[Settings, list[float]]:
        """The request's settings with None replaced by the defaults, checked (and its sigma schedule)."""
        embeds = r["prompt_embeds"]
        if embeds is not None and r["prompt"] is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if embeds is None and r["prompt"] is None:
            raise ValueError("prompt is missing: pass prompt (text), or prompt_embeds with prompt_attention_mask")
        for name in ("prompt", "negative_prompt"):
            if r[f"{name}_embeds"] is not None and r[f"{name}_attention_mask"] is None:
                raise ValueError(f"{name}_embeds needs {name}_attention_mask (encode_prompt returns both)")
        negative = r["negative_prompt_embeds"]
        if embeds is not None and negative is not None and negative.shape[0] != embeds.shape[0]:
            raise ValueError(
                f"prompt_embeds has {embeds.shape[0]} rows but negative_prompt_embeds {negative.shape[0]}: one each"
            )
        for name in ("num_videos_per_prompt", "max_sequence_length"):
            value = r[name]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1; got {value!r}")
        if r["generator"] is not None and (r["seed"] is not None or r["noise"] == "genmo"):
            raise ValueError("pass seed (with noise='cpu' or 'genmo') or generator, not both")
        d = self.defaults
        given = {k: r[k] for k in SETTING_ARGUMENTS if r.get(k) is not None}
        pixels = pixels_in.read_input(*(r[k] for k in PIXEL_INPUTS))
        if pixels is not None and pixels.kind != "image":  # the size (and a video's length) come from the video
            t, h, w = pixels.frames.shape[:3]
            given = {"height": h, "width": w} | given
            if pixels.kind == "video" and "num_frames" not in given:
                given["num_frames"] = t if MOCHI.valid_frames(t) else MOCHI.num_frames(MOCHI.latent_frames(t))
        s = replace(d, prompt="" if embeds is not None else r["prompt"], **given)
        frames = s.num_frames
        if isinstance(frames, int) and frames >= 1 and not MOCHI.valid_frames(frames):
            rounded = MOCHI.num_frames(MOCHI.latent_frames(frames))
            warnings.warn(
                f"num_frames={frames} is not of the form 6k+1; generating {rounded} frames as diffusers does "
                f"(nearest valid: {MOCHI.nearest_frames(frames)})",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
            s = replace(s, num_frames=rounded)
        sigmas = r["sigmas"]
        if r["timesteps"] is not None:
            if sigmas is not None:
                raise ValueError("pass sigmas or timesteps, not both")
            sigmas = [1.0 - float(t) / 1000.0 for t in r["timesteps"]] + [0.0]
        if sigmas is not None:
            sigmas = check_sigmas(sigmas)
            s = replace(s, num_inference_steps=len(sigmas) - 1)
        s.check("api")
        if pixels is None:
            return s, sigmas if sigmas is not None else s.sigmas, None
        self._check_encoder()
        pixels = pixels_in.fit_input(pixels, s.num_frames, s.height, s.width)
        for note in pixels.notes:
            warnings.warn(note, UserWarning, stacklevel=_user_stacklevel())
        if pixels.kind == "video":
            if sigmas is not None:
                raise ValueError("video to video makes its schedule from strength; pass strength, not sigmas/timesteps")
            sigmas = pixels_in.cut_schedule(s.strength, s.num_inference_steps, s.threshold_noise, s.linear_steps)
        elif self.is_pusa and s.image_mode != "replace":
            raise ValueError("a Pusa model conditions by per-frame sigmas: image_mode does not apply (leave it unset)")
        return s, sigmas if sigmas is not None else s.sigmas, pixels

    def _folder_encoder(self, load: bool = True) -> nn.Module | bool | None:
        """The model folder's VAE encoder (fp32, the variant the pipeline was loaded with), None if it has none;
        `load=False`: only whether it has one."""
        folder = self.sources.get("model_dir")
        if folder is None:
            return None if load else False
        with warnings.catch_warnings(), variant_view(Path(folder), self.sources.get("variant")) as view:
            warnings.simplefilter("ignore")  # a missing variant was reported when the pipeline loaded
            if not has_vae_part(view, "encoder"):
                return None if load else False
            return load_vae_encoder(view) if load else True

    def _check_encoder(self) -> None:
        """An image or video input needs the VAE encoder: refuse before any work when the model folder has none."""
        if self.vae_encoder is not None:
            return
        folder = self.sources.get("model_dir")
        if not self._folder_encoder(load=False):
            raise FileNotFoundError(
                f"image and video inputs need the VAE encoder: {folder} has no encoder.safetensors (or vae/); add "
                "it to the model folder, or set pipe.vae_encoder"
            )

    @torch.inference_mode()
    def sample(
        self,
        request: Request,
        batch_cfg: bool | str = "auto",
        callback_on_step_end: Callable | None = None,
        dit_hook: DiTHook | None = None,
        progress: bool = True,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """The Euler/CFG loop from the request's noise to the DiT's latents (B, 12, T, H/8, W/8), fp32.

        `batch_cfg`: both CFG branches in one DiT call (faster; twice the DiT's activations): True, False, or "auto"
        (batched when the memory plan has room for it; on a CPU device, when the activations fit the free RAM).
        `callback_on_step_end(pipe, i, t, kwargs)` runs after step i (see `__call__`); a dict it returns with
        "latents", "prompt_embeds" or "negative_prompt_embeds" replaces them for the next steps. Once
        `pipe.interrupt` is set, sampling stops after the step and returns the latents reached. `dit_hook(call) ->
        velocity` wraps every DiT call (`sampling.DiTCall`). The DiT's per-generation tables are released at the end.
        """
        steps = len(request.sigmas) - 1
        guided = request.uncond is not None
        batch_cfg = self._plan_request(request.latents.shape, guided, check_batch_cfg(batch_cfg)).batch_cfg
        self.last_batch_cfg = batch_cfg if guided else None
        text = _LoopText(request.cond, request.uncond)
        hooks = (callback_on_step_end, tuple(callback_on_step_end_tensor_inputs), text)
        steering = request.conditioning
        if steering is not None and steering.dit_hook is not None:  # "guide": its correction on top of dit_hook
            guide, inner = steering.dit_hook, dit_hook
            dit_hook = lambda call: guide(call, inner)  # noqa: E731
        if callback_on_step_end is not None:  # it may replace the prompt embeddings: the DiT calls take the new ones
            dit_hook = text.hook(dit_hook)
        try:
            with (
                self._on_device(self.dit) as dit,
                self._after_each_step(request, hooks, progress) as after,
            ):
                if self.cp is not None and self.cp.cfg_group is not None and guided:
                    from .distributed import CFGParallelDiT

                    dit, batch_cfg = CFGParallelDiT(dit, self.cp), True  # each half of the ranks runs one branch
                    self.last_batch_cfg = True
                sampler, per_frame = denoise, {}
                if request.per_frame is not None:  # Pusa: every latent frame at its own sigma
                    sampler = pusa.denoise_per_frame
                    per_frame = dict(zip(("cond_frames", "noise_multiplier"), request.per_frame, strict=True))
                return sampler(
                    dit,
                    request.latents.to(self.device),
                    request.sigmas[: steps + 1],
                    request.cond,
                    request.uncond,
                    request.guidance,
                    batch_cfg=batch_cfg,
                    callback=after,
                    dit_hook=dit_hook,
                    **per_frame,
                )
        except _Interrupted as stop:
            return stop.latents
        finally:
            self._release_dit_tables()

    def decode_latents(self, latents: torch.Tensor, output_type: str = "np"):
        """Decode latents kept from `output_type="latent"` (or a latents file's) later, with the decode settings in
        force now (`enable_vae_tiling`, ...): `decode` under the name the issue tracker and diffusers users look for."""
        return self.decode(latents, output_type)

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        output_type: str = "np",
        denormalize: bool = True,
        prefix: tuple[np.ndarray | None, int] = (None, 0),
    ):
        """The DiT's latents -> videos: "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil".

        `denormalize=False`: the latents are already in the VAE's space (what `pipe.vae.decode` takes). With
        `pipe.vae.enable_slicing()`, the videos of a batch decode one at a time. Out of memory, the decode frees what
        it held and tries once more with a smaller plan (`decode_frames`); if that runs out too, `DecodeMemoryError`
        carries the latents, so they are not lost. `last_decode_options`: the decode options that made the video
        (`vae_options`, or the smaller plan of the retry). `prefix` (frames (T, H, W, 3) uint8, n): each video
        becomes those frames followed by its own after its first n (an extension: the input, then the new frames).
        """
        if output_type not in VIDEO_TYPES:
            raise ValueError(f"decode's output_type must be one of {VIDEO_TYPES}; got {output_type!r}")
        group = self.cp.group if self.cp is not None else None  # several processes: each decodes a time slice
        try:
            with self._on_device(self.decoder) as decoder:
                videos = []
                for z in latents.split(1) if self.vae.use_slicing else [latents]:
                    frames, self.last_decode_options = decode_frames(
                        decoder, z, self.latent_stats, self.vae_options, group, denormalize
                    )
                    videos.append(frames)
        except (torch.OutOfMemoryError, MemoryError) as e:  # moving the decoder to the device (offload modes)
            message = f"out of device memory moving the VAE decoder to {self.device} ({_first_line(e)})"
            raise DecodeMemoryError(message, latents.detach().cpu(), [dict(self.vae_options)]) from None
        frames = torch.cat(videos) if len(videos) > 1 else videos[0]
        before, skip = prefix
        if before is not None:  # uint8 / 255 comes back as the same bytes (x 255, truncated) when written
            before = torch.from_numpy(np.ascontiguousarray(before)).to(frames.device, torch.float32) / 255.0
            frames = torch.cat([before.expand(frames.shape[0], *before.shape), frames[:, skip:]], dim=1)
        return convert_frames(frames, output_type)

    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """diffusers' four tensors: (prompt_embeds (B * n, L, D), prompt_attention_mask (B * n, L) bool,
        negative_prompt_embeds, negative_prompt_attention_mask), the negative ones None without guidance.

        Given embeddings pass through (masks as bool); the rest is encoded with T5 (`max_sequence_length` tokens,
        default 256; negative_prompt None means ""). n = `num_videos_per_prompt` repeats each prompt's row n times,
        in order (video j of prompt i is row i * n + j, masks included). On `device` (default: the pipeline's), in
        `dtype` (default: T5's).
        """
        length = max_sequence_length or self.t5.max_length
        prompts = negatives = []
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("encode_prompt needs prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = len(prompts) if prompt_embeds is None else len(prompt_embeds)
            negative = "" if negative_prompt is None else negative_prompt
            negatives = [negative] * batch if isinstance(negative, str) else list(negative)
            if len(negatives) != batch:
                raise ValueError(f"{batch} prompts but {len(negatives)} negative prompts")
        if prompts or negatives:  # one T5 pass (and, offloaded, one trip to the device) for both
            features, mask = self._encode(prompts + negatives, length)
            n = len(prompts)
            if prompts:
                prompt_embeds, prompt_attention_mask = features[:n], mask[:n]
            if negatives:
                negative_prompt_embeds, negative_prompt_attention_mask = features[n:], mask[n:]
        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        device = torch.device(device) if device is not None else self.device

        def place(t: torch.Tensor | None, mask: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.repeat_interleave(num_videos_per_prompt, dim=0) if num_videos_per_prompt != 1 else t
            return t.to(device, torch.bool) if mask else t.to(device, dtype or t.dtype)

        return (
            place(prompt_embeds),
            place(prompt_attention_mask, mask=True),
            place(negative_prompt_embeds),
            place(negative_prompt_attention_mask, mask=True),
        )

    def _encode(self, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features and masks of `prompts` (`length` tokens), on the pipeline's device."""
        if self.t5.model is None:
            raise RuntimeError(
                "the text encoder was freed (free_text_encoder()); pass prompt_embeds and prompt_attention_mask "
                "(and the negative ones) computed with encode_prompt before freeing it"
            )
        with self._on_device(self.t5) as t5:
            saved, t5.max_length = t5.max_length, length
            try:
                features, mask = t5.encode(prompts)
                if not self.force_zeros_for_empty_prompt and "" in prompts:  # diffusers' default: "" keeps its EOS
                    rows = torch.tensor([p == "" for p in prompts])
                    ids = torch.zeros(1, length, dtype=torch.long, device=features.device)
                    ids[0, 0] = t5.tokenizer.eos_token_id
                    eos = ids != 0
                    with torch.autocast(features.device.type, enabled=False):
                        empty = t5.model(input_ids=ids, attention_mask=eos.long()).last_hidden_state
                    features[rows], mask[rows] = empty.to(features.dtype), eos
            finally:
                t5.max_length = saved
        return features.to(self.device), mask.to(self.device)

    @contextmanager
    def _after_each_step(self, request: Request, hooks: tuple, progress: bool):
        """The sampler's per-step callback: a progress bar, a NaN/inf guard, the user's callback_on_step_end, then
        the interrupt check."""
        callback, inputs, text = hooks
        steering = request.conditioning
        steps = len(request.sigmas) - 1
        timesteps = self.scheduler.timesteps.to(self.device)
        config = {"desc": "sampling", "unit": "step", **self._progress_bar_config}
        config["disable"] = config.get("disable", False) or not (progress and self.is_main_process)
        bar = tqdm(total=steps, **config)

        def after(i: int, sigma: float, z: torch.Tensor) -> torch.Tensor | None:
            bar.update()
            if not torch.isfinite(z).all():
                raise NonFiniteLatentsError(
                    f"the latents became NaN or inf at step {i + 1} of {steps} (sigma {sigma:.4f}); no video was "
                    "written. Check the weights' dtype (T5 in fp16 overflows), or lower the guidance scale."
                )
            replaced = None
            if steering is not None and steering.after_step is not None:  # the anchor first, then the user's
                replaced = steering.after_step(i, sigma, z)
                z = z if replaced is None else replaced
            if callback is not None:
                kwargs = {k: z if k == "latents" else text.embeddings(k) for k in inputs}
                out = callback(self, i, timesteps[i], kwargs)
                if isinstance(out, dict):
                    text.take(out)
                    replaced = out["latents"] if out.get("latents") is not None else replaced
            if self._interrupt:
                raise _Interrupted(z if replaced is None else replaced.float())
            return replaced

        with bar:
            yield after

    # ---- several processes ---------------------------------------------------------------------------------

    def enable_context_parallel(
        self, group=None, cfg_parallel: bool | None = None, shard_dit: bool = False
    ) -> MochiPipeline:
        """Generate each video with every rank of `group` (default: all; call it on every rank, same arguments).

        The DiT splits its visual tokens across the ranks (any count; the head count must divide by the ranks per
        CFG half); `cfg_parallel` (default: with an even rank count) runs the conditional and unconditional passes
        on different halves of the ranks; `shard_dit` keeps block i only on rank i mod N; the VAE decode is split
        along time. Every rank returns the video; pass progress=False on ranks other than 0 or use `is_main_process`.
        """
        from .distributed import ContextParallel

        cp = ContextParallel(group, cfg_parallel=cfg_parallel, device=self.device)
        return self._use_context_parallel(cp, shard_dit)

    def _use_context_parallel(self, cp, shard_dit: bool = False) -> MochiPipeline:
        from .distributed import check_compatible
        from .distributed import shard_dit as shard

        check_compatible(self.memory.mode, True, shard_dit)
        if self.dit.cfg.num_heads % cp.seq_size:
            raise ValueError(
                f"{cp.seq_size} ranks per CFG half do not divide the DiT's {self.dit.cfg.num_heads} heads; use a "
                f"rank count whose half (with CFG parallelism) or whole divides {self.dit.cfg.num_heads}"
            )
        self.cp = cp
        if cp.device != self.device:
            self.to(cp.device)  # "cuda" becomes this rank's GPU
        self.dit.set_token_layout(cp.token_layout())
        if shard_dit:
            self.memory.drop_all()  # the blocks' tensors are about to be replaced
            shard(self.dit, cp)
        return self

    @property
    def is_main_process(self) -> bool:
        """Whether this process should write files and report: rank 0, or the only process."""
        return self.cp is None or self.cp.is_main

    # ---- memory modes --------------------------------------------------------------------------------------

    def set_memory_mode(
        self, mode: str = "auto", budget: int | None = None, mover: Mover | None = None
    ) -> MochiPipeline:
        """Choose where the weights live (the machinery: `offload.py`); they move as the mode wants them now.

        "resident": T5, the DiT and the VAE decoder stay on the device (placed now). "model": each is copied to the
        device for its stage and the copy dropped after (`enable_model_cpu_offload`). "sequential": also the DiT
        blocks that do not fit stream through the device, the next one copied while one computes
        (`enable_sequential_cpu_offload`). "auto" (the default): at each generation, the first of resident,
        resident with T5 leaving after encoding, model and sequential whose estimate fits (printed with the progress
        bar; `MochiOutput.memory` records it). `budget`: device bytes the modes plan with (default: 90% of the free
        memory plus what the pipeline holds there). `mover`: what copies the weights (`offload.LedgerMover` stands in
        for a device in tests and benchmarks).
        """
        mode = check_mode(mode)
        if self.cp is not None:
            from .distributed import check_compatible, is_sharded

            check_compatible(mode, True, is_sharded(self.dit))
        if mover is not None:
            self.memory.set_mover(mover)
        self.memory.mode, self.memory.budget_bytes = mode, budget
        self.memory.plan, self._plan_key = None, None
        if mode != "auto":  # the mode is known: the weights go where it wants them, now
            with self._memory_errors("load"):
                self.memory.apply(self._resolve(self._footprint()))
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> MochiPipeline:
        """Keep every component on the CPU; each is copied to the device while it runs, and the copy dropped after."""
        if device is not None:
            self.device = device
        return self.set_memory_mode("model")

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> MochiPipeline:
        """Like model offload, and the DiT blocks that do not fit (and T5's) stream through the device: neither
        model has to fit at once."""
        if device is not None:
            self.device = device
        return self.set_memory_mode("sequential")

    def disable_cpu_offload(self) -> MochiPipeline:
        """Everything on the device (the resident mode)."""
        return self.set_memory_mode("resident")

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MochiPipeline:
        """`to(device)`, `to(dtype)`, `to(device, dtype)` as in diffusers. The device: where the pipeline runs; which
        weights live there is the memory mode's choice (resident: all, placed now; auto: decided at the next
        generation; the offload modes: each while it runs). The dtype: the DiT's (T5 and the VAE keep fp32, as
        Genmo runs them; RoPE frequencies and QK-norm weights stay fp32)."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        if dtype is not None and dtype != self.dit.dtype:
            current, keep = self.dit.dtype, set(self.dit.fp32_parameter_names())
            for name, p in self.dit.named_parameters():
                if name not in keep and p.dtype == current:  # fp8 weights and their scales stay as they are
                    p.data = p.data.to(dtype)
        if device is None:
            return self
        self.device = device
        if self.memory.mode != "auto":
            self.set_memory_mode(self.memory.mode, self.memory.budget_bytes)
        return self

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes."""
        return self.memory.mover.device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        device = torch.device(device)
        if device != self.memory.mover.device:
            self.memory.set_mover(Mover(device))  # what was on the old device leaves it first
            self.memory.plan, self._plan_key = None, None

    @property
    def memory_mode(self) -> str:
        """The mode in force: "resident", "model" or "sequential"; "auto" until auto has chosen."""
        return self.memory.plan.mode if self.memory.plan is not None else self.memory.mode

    @property
    def offload(self) -> str:
        """The mode in force, as the offload flags name it: "none" (resident), "model", "sequential" (or "auto")."""
        return "none" if self.memory_mode == "resident" else self.memory_mode

    def memory_record(self) -> dict:
        """The memory plan in force (`offload.Plan.record`) and the bytes each stage of the latest generation moved
        to the device (the sidecar's "memory")."""
        plan = self.memory.plan
        record = plan.record() if plan is not None else {"asked": self.memory.mode, "device": str(self.device)}
        moved = self.memory.ledger.last_moved
        return {**record, "moved_bytes": {k: moved[k] for k in ("text", "dit", "vae") if k in moved}}

    def enable_vae_tiling(self, **options) -> MochiPipeline:
        """Decode in overlapping, cross-faded spatial tiles; `frames_per_chunk=k` also streams time (exact).

        Options are the decoder's: tiles=(rows, cols), overlap (latent pixels), frames_per_chunk. The default mode,
        "auto", already picks streaming and tiling from the free device memory.
        """
        if unknown := sorted(set(options) - {"tiles", "overlap", "frames_per_chunk"}):
            raise TypeError(
                f"unknown VAE tiling options {unknown}; valid: tiles=(rows, cols), overlap, frames_per_chunk"
            )
        self.vae_options = {"mode": "tiled", **options}
        return self

    def disable_vae_tiling(self) -> MochiPipeline:
        self.vae_options = {"mode": "full"}
        return self

    def compile(self, dit: bool = True, vae: bool = True, **compile_kwargs) -> MochiPipeline:
        """Opt in to torch.compile for the DiT's blocks and the VAE decoder's ResBlocks (same results to float
        rounding; the first generation at each size pays the compilation, minutes for the full model)."""
        if dit:
            self.dit.compile_blocks(**compile_kwargs)
        if vae:
            self.decoder.compile_blocks(**compile_kwargs)
        return self

    def free_text_encoder(self) -> None:
        """Drop T5's weights (about 19 GB in fp32) once the prompts you need are encoded (`encode_prompt`); the
        pipeline still generates from prompt embeddings."""
        self.memory.forget("text_encoder")
        self.t5.unload()

    def _footprint(self, shape: tuple[int, ...] | None = None, guided: bool = True) -> Footprint:
        """What a generation of latents `shape` (B, 12, T, H, W) needs on the device (`offload.footprint`; default:
        one guided video of 31 frames at 848x480)."""
        shape = shape if shape is not None else (1, *MOCHI.latent_shape(31, 480, 848))
        ranks = self.cp.seq_size if self.cp is not None else 1
        return footprint(self.dit, self.decoder, self.t5.model, shape, guided, self.t5.max_length, ranks)

    def _resolve(self, fp: Footprint, batch_cfg: bool | str = "auto") -> Plan:
        m = self.memory
        budget = m.budget() if self.cp is None else self.cp.agree_min(m.budget())  # one plan for every rank
        return choose(m.mode, fp, budget, self.device, m.mover.copies, batch_cfg, sequential_ok=self.cp is None)

    def _plan_request(
        self, shape: tuple[int, ...], guided: bool, batch_cfg: bool | str = "auto", fresh: bool = False
    ) -> Plan:
        """The memory plan for a request of latents `shape`, with the weights placed as it wants them between
        stages. Made again for a new request (`fresh`: prepare), another size or another `batch_cfg`."""
        key = (tuple(shape), guided, batch_cfg, self.memory.mode, self.memory.budget_bytes, str(self.device))
        if fresh or self.memory.plan is None or key != self._plan_key:
            self._plan_key = key
            self.memory.apply(self._resolve(self._footprint(tuple(shape), guided), batch_cfg))
        return self.memory.plan

    def _announce(self, progress: bool) -> None:
        """Print the memory plan (one line on stderr) when it is not the one printed last."""
        plan = self.memory.plan
        if plan is not None and progress and self.is_main_process and plan.describe() != self._shown:
            self._shown = plan.describe()
            print(self._shown, file=sys.stderr)

    @staticmethod
    def _conditioning_record(request: Request) -> dict | None:
        """What a pixel input did, for `MochiOutput.conditioning` and the sidecar."""
        c = request.conditioning
        return None if c is None else {**c.record, "notes": list(c.notes)}

    def _release_dit_tables(self) -> None:
        """Free what the DiT keeps on the device for one generation (its RoPE tables)."""
        release = getattr(self.dit, "release_tables", None)
        if callable(release):
            release()
        else:
            self.dit._rope_cache = None

    @contextmanager
    def _on_device(self, part):
        """Run `part` (T5, the DiT or the VAE decoder) on the device, its weights placed as the memory plan wants them
        for its stage (in the offload modes they leave the device afterwards)."""
        names = {id(self.t5): "text_encoder", id(self.dit): "dit", id(self.decoder): "decoder"}
        if self.memory.plan is None:  # a stage run on its own, before any request: plan for the default size
            self.memory.plan = self._resolve(self._footprint())
        with self.memory.use(names[id(part)], self.memory.plan):
            yield part

    @contextmanager
    def _memory_errors(self, stage: str):
        """Turn the device running out of memory into a `DeviceMemoryError` that names the mode to try."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise DeviceMemoryError(self._oom_advice(stage)) from e

    @contextmanager
    def _stage(self, name: str, timings: dict, peaks: dict):
        """Time a stage (the device synchronised at both ends, so the clock sees its work) and record the device's
        peak memory during it (and the ledger's); turn device OOM into advice."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        with self._memory_errors(name), self.memory.ledger.during(name):
            with self.cp.guard() if self.cp is not None else nullcontext():  # one rank failing stops them all
                yield
                if cuda:
                    torch.cuda.synchronize(self.device)
        timings[name] = time.perf_counter() - start
        peaks[name] = torch.cuda.max_memory_allocated(self.device) if cuda else _peak_rss()

    def _oom_advice(self, stage: str) -> str:
        """What to try after running out of device memory in `stage` ("load": placing the weights): the next memory
        mode that fits by the estimates, named with its API call and CLI flag, then what else lowers the need."""
        plan = self.memory.plan
        mode = plan.mode if plan is not None else ("resident" if self.memory.mode == "auto" else self.memory.mode)
        batched = bool(plan is not None and plan.batch_cfg and self.last_batch_cfg is not False)
        try:
            shape, guided = self._plan_key[:2] if self._plan_key is not None else (None, True)
            fp, budget = self._footprint(shape, guided), self.memory.budget()
        except Exception:  # the advice must not fail: without estimates, the next mode of the ladder
            fp, budget = None, None
        tips = [tip for tip in [next_mode_advice(mode, fp, budget, batched)] if tip]
        if stage == "vae" and self.vae_options.get("mode") != "tiled":
            tips.append("enable_vae_tiling() (--vae_tiling on)")
        if stage == "dit":
            tips.append(
                "fewer frames or a smaller size" + (", or batch_cfg=False (--batch_cfg off)" if batched else "")
            )
        if stage in ("load", "text"):
            tips.append("T5 in bf16 (text_encoder_dtype=torch.bfloat16, --t5_dtype bf16)")
        if stage in ("load", "dit") and mode != "resident":
            tips.append('fp8 DiT weights (fp8="tensor", --fp8 tensor)')
        where = "placing the weights" if stage == "load" else f"during the {stage} stage"
        return f"out of device memory {where} (memory mode: {NAMES[mode]}); nothing was written. Try " + "; ".join(tips)


def initial_latents(
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    noise: str = "cpu",
) -> tuple[torch.Tensor, int | None, str | None]:
    """(noise, the seed that made it, the device that drew it): `latents` if given (their shape checked; no seed, no
    device), else noise from `generator` on its own device (one for the batch, or a list of one per video, each
    drawing its own video, as diffusers does; no seed), else from `seed`, else from a random seed.

    With a seed, `noise` says how it draws: "cpu", a CPU generator seeded with it (the same noise on any device);
    "genmo", `torch.manual_seed(seed)` then the global generator of `device`, as Genmo's sampler does (on a CPU the
    two are the same). A generator on another device than `device` (the pipeline's) is refused here, before any
    work; a CPU generator is always fine (the noise then moves to the device)."""
    shape = (batch, *MOCHI.latent_shape(num_frames, height, width))
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request; got {tuple(latents.shape)}")
        return latents.float(), None, None
    if generator is not None:
        generators = list(generator) if isinstance(generator, Sequence) else [generator]
        if len(generators) not in (1, batch):
            raise ValueError(f"{len(generators)} generators for {batch} videos: pass one, or one per video")
        drawn_on = torch.device(generators[0].device)
        if drawn_on.type != "cpu" and device is not None and not _same_device(drawn_on, torch.device(device)):
            raise ValueError(
                f"the generator is on {drawn_on} but the pipeline runs on {torch.device(device)}: pass a generator "
                f"on {torch.device(device)} (torch.Generator({str(torch.device(device))!r})) or on the CPU "
                "(torch.Generator(), the default: the same noise on any device)"
            )
        if len(generators) == 1:
            z = get_noise(batch, num_frames, height, width, generator=generators[0])
        else:
            z = torch.cat([get_noise(1, num_frames, height, width, generator=g).to(drawn_on) for g in generators])
        return z, None, str(z.device)
    if seed is None:
        seed = secrets.randbits(SEED_BITS)
    if noise == "genmo":
        torch.manual_seed(seed)
        where = torch.device(device or "cpu")
        return torch.randn(shape, device=where, dtype=torch.float32), seed, str(where)
    return get_noise(batch, num_frames, height, width, seed=seed), seed, "cpu"


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one; a device without an index is the current one of its type (taken to
    match any index where the current one cannot be asked)."""
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.index is not None and b.index is not None:
        return False
    if a.type == "cuda" and torch.cuda.is_available():
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return True


def decode_frames(
    decoder: nn.Module,
    latents: torch.Tensor,
    latent_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    vae_options: dict | None = None,
    group=None,
    denormalize: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The DiT's latents (B, 12, T, H, W) -> (frames (B, T', H', W', 3) in [0, 1] on the decoder's device, the decode
    options used), with the VAE's latent statistics (None: the published ones) and `vae.decode`'s options.
    `denormalize=False`: the latents are already in the VAE's space.

    When memory runs out (`torch.OutOfMemoryError`, or `MemoryError`: no plan fits the budget), what the attempt held
    is released and the decode runs once more with `smaller_vae_options` (in one process; the ranks of a time split
    would have to retry together). If that fails too, `DecodeMemoryError` carries the latents (on the CPU).
    """
    options = dict(vae_options or {"mode": "auto"})
    z = denormalize_latents(latents, *(latent_stats or (None, None))) if denormalize else latents
    device = next(decoder.parameters()).device
    tried, failures = [], []
    for attempt in range(1 if group is not None else 2):
        if attempt:  # the first try's tensors went with its exception: give their memory back, then plan smaller
            release_memory(device)
            options = smaller_vae_options(options, decoder, tuple(z.shape))
            warnings.warn(
                f"out of memory decoding the video ({failures[-1]}); trying once more with "
                f"{describe_vae_options(options)}",
                RuntimeWarning,
                stacklevel=2,
            )
        tried.append(options)
        try:
            video = vae_decode(decoder, z, group=group, **options)  # (B, 3, T, H, W), float32
        except (torch.OutOfMemoryError, MemoryError) as e:
            failures.append(f"{describe_vae_options(options)}: {_first_line(e)}")
            continue
        # [-1, 1] -> [0, 1], in place (the same numbers as out of place, without two more video-sized buffers)
        frames = video.float().add_(1.0).div_(2.0).clamp_(0.0, 1.0).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 3)
        return frames, options
    del z
    release_memory(device)
    tries = "; then with a smaller plan, ".join(failures)
    raise DecodeMemoryError(f"out of device memory decoding the video with {tries}", latents.detach().cpu(), tried)


def release_memory(device: str | torch.device) -> None:
    """Give memory no longer referenced back: collect garbage, and return the CUDA allocator's cached blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _blocks(part) -> nn.ModuleList | None:
    """The repeated blocks that sequential offload streams: the DiT's, and T5's (about 19 GB in fp32)."""
    if isinstance(part, AsymmDiT):
        return part.blocks
    if isinstance(part, TextEncoder) and part.model is not None:
        return part.model.encoder.block
    return None


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux), or 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def convert_frames(frames: torch.Tensor, output_type: str):
    """(B, T, H, W, 3) floats in [0, 1] -> "np" (the same, float32), "pt" (B, T, 3, H, W) or "pil" (lists of images)."""
    if output_type not in VIDEO_TYPES:
        raise ValueError(f"output_type must be one of {VIDEO_TYPES}; got {output_type!r}")
    if output_type == "pt":
        return frames.permute(0, 1, 4, 2, 3).cpu()  # (B, T, 3, H, W), as diffusers
    array = frames.cpu().numpy().astype(np.float32)
    if output_type == "np":
        return array
    from PIL import Image

    return [[Image.fromarray((f * 255).astype(np.uint8)) for f in video] for video in array]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _user_stacklevel() -> int:
    """The `warnings.warn` stacklevel that points at the first caller outside this package (and torch's wrappers)."""
    frame, level, package = sys._getframe(1), 1, str(Path(__file__).parent)
    while frame is not None and frame.f_code.co_filename.startswith((package, str(Path(torch.__file__).parent))):
        frame, level = frame.f_back, level + 1
    return level


@contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """Switch off any autocast the caller runs under (CPU and the pipeline's device): the pipeline keeps its dtypes."""
    with torch.autocast("cpu", enabled=False):
        with torch.autocast(device.type, enabled=False) if device.type != "cpu" else nullcontext():
            yield


# ---- loading arguments -------------------------------------------------------------------------------------

DTYPE_DEFAULTS = {"transformer": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float32}


def component_dtypes(
    torch_dtype=None, dtype=None, text_encoder_dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None
) -> dict[str, torch.dtype]:
    """Each loaded component's dtype from from_pretrained's dtype arguments (see its docstring)."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError("pass torch_dtype or dtype (its newer name in diffusers), not both")
    given = dtype if dtype is not None else torch_dtype
    dtypes = dict(DTYPE_DEFAULTS)
    if isinstance(given, Mapping):
        if unknown := sorted(set(given) - {*DTYPE_DEFAULTS, "default"}):
            raise ValueError(f"torch_dtype names unknown components {unknown}; valid: {[*DTYPE_DEFAULTS, 'default']}")
        dtypes = {name: given.get(name, given.get("default", d)) for name, d in DTYPE_DEFAULTS.items()}
    elif given is not None:
        dtypes["transformer"] = given
    if text_encoder_dtype is not None:
        dtypes["text_encoder"] = text_encoder_dtype
    if vae_dtype is not None:
        dtypes["vae"] = vae_dtype
    if bad := {k: v for k, v in dtypes.items() if not isinstance(v, torch.dtype) or not v.is_floating_point}:
        raise ValueError(f"dtypes must be floating-point torch dtypes such as torch.bfloat16; got {bad}")
    return dtypes


def check_overrides(transformer=None, vae=None, text_encoder=None, tokenizer=None, scheduler=None) -> None:
    """Refuse component overrides of the wrong kind before anything loads."""
    expected = {
        "transformer": (transformer, AsymmDiT, "an AsymmDiT (e.g. other_pipe.transformer)"),
        "vae": (vae, (MochiVAE, nn.Module), "a pipeline's vae or a VAE Decoder"),
        "text_encoder": (text_encoder, (nn.Module, TextEncoder), "a transformers T5EncoderModel"),
        "scheduler": (scheduler, MochiScheduler, "a MochiScheduler"),
    }
    for name, (value, kind, what) in expected.items():
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name}= must be {what}; got {type(value).__name__}")
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer= must be a T5 tokenizer; got {type(tokenizer).__name__}")


def load_tokenizer(t5_dir: Path):
    """The T5 tokenizer of a T5 folder (its tokenizer/ subfolder in diffusers' layout), with Genmo's settings."""
    from transformers import T5Tokenizer

    folder = t5_dir / "tokenizer" if (t5_dir / "tokenizer").is_dir() else t5_dir
    return T5Tokenizer.from_pretrained(folder, legacy=False)


REQUEST_ARGUMENTS = frozenset(inspect.signature(MochiPipeline.__call__).parameters) - {
    "self", "output_type", "return_dict", "attention_kwargs", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs", "batch_cfg", "progress", "dit_hook",
}  # fmt: skip


# ---- model folders -----------------------------------------------------------------------------------------


def resolve_model_dir(path: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """A local folder as it is; an `org/name` Hub id through the local Hugging Face cache (`cache_dir`, default the
    usual one; `revision`: a branch, tag or commit), never downloading."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(
            f"{p} is a file; expected a model folder (dit.safetensors + decoder.safetensors, "
            "or a diffusers folder with transformer/, vae/, text_encoder/, tokenizer/)"
        )
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(path), cache_dir=cache_dir, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(
                f"{path} is not a local folder and not in the local Hugging Face cache; download it first "
                f"(`python -m mochi_preview.download DIR` or `huggingface-cli download {path}`) or pass the folder "
                "that holds the weights"
            ) from e
    raise FileNotFoundError(f"model folder not found: {p}")


def check_model_dir(folder: Path, text_encoder_path: str | Path | None = None, given: set[str] = frozenset()) -> None:
    """Name every missing part of a model folder at once, with what each layout expects; `given`: the parts passed
    as objects ("dit", "vae", "t5"), which the folder need not hold."""
    missing = []
    has_dit = (folder / "dit.safetensors").is_file() or (folder / "transformer").is_dir() or pusa.is_pusa_folder(folder)
    if "dit" not in given and not has_dit:
        missing.append(f"the DiT (dit.safetensors, {pusa.PUSA_DIT_FILE}, or transformer/)")
    if "vae" not in given and not ((folder / "decoder.safetensors").is_file() or (folder / "vae").is_dir()):
        missing.append("the VAE decoder (decoder.safetensors, or vae/)")
    if text_encoder_path is None and "t5" not in given:
        try:
            find_text_encoder_dir(folder)
        except FileNotFoundError:
            missing.append(
                f"the T5 text encoder (text_encoder/ + tokenizer/, or t5/; {T5_HUB_ID} is not in the local Hugging "
                "Face cache either; or pass --t5_dir)"
            )
    if missing:
        raise FileNotFoundError(
            f"{folder} is missing {'; '.join(missing)}. A native folder holds dit.safetensors, decoder.safetensors "
            "(encoder.safetensors optional) and a T5 folder; a diffusers folder holds transformer/, vae/, "
            "text_encoder/ and tokenizer/."
        )


def find_text_encoder_dir(folder: Path) -> Path:
    """The T5 of a model folder: diffusers' text_encoder/ + tokenizer/, or a t5/ subfolder (native layout); else,
    as Genmo's code reads it, the Hub's google/t5-v1_1-xxl from the local Hugging Face cache."""
    for candidate in (folder, folder / "t5", folder / "t5-v1_1-xxl"):
        if (candidate / "text_encoder").is_dir() or (candidate is not folder and (candidate / "config.json").is_file()):
            return candidate
    try:
        return resolve_t5(T5_HUB_ID)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no T5 text encoder in {folder}: expected {folder / 'text_encoder'} and {folder / 'tokenizer'} "
            f"(diffusers layout) or {folder / 't5'} (a {T5_HUB_ID} download), and {T5_HUB_ID} is not in the local "
            "Hugging Face cache; pass its folder with --t5_dir / text_encoder_path=, or download it "
            "(python -m mochi_preview.download DIR puts T5 in DIR)"
        ) from None


# ---- weight variants (diffusers' `variant=`) ---------------------------------------------------------------

VARIANT_FOLDERS = ("transformer", "vae", "text_encoder")


def weights_variant(name: str) -> str | None | bool:
    """The variant a safetensors weight or index file belongs to (None: the plain files; False: not a weight file).

    Every spelling diffusers and transformers have used: `x.bf16.safetensors`, `x-00001-of-00002.bf16.safetensors`,
    `x.bf16-00001-of-00002.safetensors`, `x.safetensors.index.bf16.json`, `x.bf16.safetensors.index.json`.
    """
    parts = name.split(".")
    if parts[-1] == "safetensors":
        extra = parts[1:-1]
    elif parts[-1] == "json" and "index" in parts and "safetensors" in parts:
        extra = [p for p in parts[1:-1] if p not in ("safetensors", "index")]
    else:
        return False
    return re.sub(r"-\d+-of-\d+$", "", extra[0]) if extra else None


def choose_variant(folder: Path, variant: str | None) -> tuple[str | None, list[Path]]:
    """(the variant to read, its weight and index files) in a component folder: `variant` if it has it, else the
    plain files (with a warning when `variant` was asked for), else the only variant there is."""
    files: dict[str | None, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if (v := weights_variant(f.name)) is not False:
            files.setdefault(v, []).append(f)
    if variant in files or not files:
        return variant, files.get(variant, [])
    if None in files:
        choice = None
    elif len(files) == 1:
        [choice] = files
    else:
        raise FileNotFoundError(f"{folder} holds the weight variants {sorted(files)}: pass variant= to choose one")
    if variant is not None:
        shown = "the plain files" if choice is None else f"the {choice!r} files"
        warnings.warn(f"{folder} has no {variant!r} variant; loading {shown} instead", stacklevel=_user_stacklevel())
    return choice, files[choice]


@contextmanager
def variant_view(folder: Path, variant: str | None = None) -> Iterator[Path]:
    """`folder` as the loaders should see it: each diffusers component folder showing only the chosen variant's
    weights under the plain names (a temporary folder of links, removed on exit; `folder` itself when nothing needs
    hiding or renaming)."""
    plans = {}
    for name in VARIANT_FOLDERS:
        if (folder / name).is_dir():
            chosen, files = choose_variant(folder / name, variant)
            others = [f for f in (folder / name).iterdir() if weights_variant(f.name) is not False]
            if chosen is not None or len(others) != len(files):
                plans[name] = files
    if not plans:
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="mochi-variant-") as tmp:
        view = Path(tmp)
        for entry in folder.iterdir():
            if entry.name not in plans:
                (view / entry.name).symlink_to(entry.resolve())
        for name, files in plans.items():
            (view / name).mkdir()
            for f in (folder / name).iterdir():
                if weights_variant(f.name) is False:
                    (view / name / f.name).symlink_to(f.resolve())
            index = [f for f in files if f.suffix == ".json"]
            for f in files:  # shards keep their names (the index lists them); an index or a single file: the plain one
                stem = f.name.split(".")[0]
                plain = f.name if index and f not in index else f"{stem}.safetensors" + (".index.json" * (f in index))
                (view / name / plain).symlink_to(f.resolve())
        yield view
