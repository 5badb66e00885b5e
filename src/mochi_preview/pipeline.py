"""MochiPipeline: prompt -> T5 -> Euler/CFG sampling with the DiT -> VAE decode -> frames.

`pipe(prompt, ...)` is three steps, each callable on its own:

    request = pipe.prepare(prompt, ...)  # check the settings, draw the initial noise, encode the prompts
    latents = pipe.sample(request)       # the Euler/CFG loop with the DiT (sampling.denoise)
    frames = pipe.decode(latents)        # the VAE decoder, then frames in [0, 1]

Hooks: `callback_on_step_end(pipe, i, sigma, {"latents": z})` runs after each step and may return {"latents": new};
`dit_hook(call)` wraps each DiT call (a `sampling.DiTCall`) and returns its velocity: it may count calls, return a
cached velocity instead of running the DiT, or run it on edited inputs (`call(latents=..., text=...)`).

Memory modes (`set_memory_mode`; the machinery is in `offload.py`): loading puts nothing on the device; each
component goes where the mode wants it once the mode is known. "auto" (the default) picks, at each generation, the
first of resident / model offload / sequential offload that fits the device's free memory; "resident" keeps
everything on the device; `enable_model_cpu_offload()` keeps each component on the CPU and copies it to the device
only while it runs; `enable_sequential_cpu_offload()` also streams the DiT's blocks that do not fit (and T5's); CFG
branches are batched when memory allows (`batch_cfg="auto"`); `enable_vae_tiling()` decodes in tiles and time chunks.
Several processes: `enable_context_parallel()` (or `from_pretrained(..., context_parallel=True)` under torchrun) makes
every rank of a process group work on each video (see `distributed.py`).
"""

from __future__ import annotations

import gc
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .dit import AsymmDiT, load_dit
from .geometry import MOCHI
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
from .sampling import (
    DiTHook,
    TextCondition,
    check_sigmas,
    denoise,
    get_noise,
    guidance_per_step,
    linear_quadratic_schedule,
)
from .settings import Settings
from .text import TextEncoder
from .vae import denormalize_latents, load_latent_stats, load_vae_decoder
from .vae.decode import decode as vae_decode
from .vae.decode import describe_vae_options, smaller_vae_options

VIDEO_TYPES = ("np", "pt", "pil")  # what `decode` makes
OUTPUT_TYPES = (*VIDEO_TYPES, "latent")
SEED_BITS = 53  # random seeds stay exact as JSON numbers read by JavaScript (the web UI) and as float64


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
class MochiOutput:
    """Videos: `frames[0]` is the first video ((T, H, W, 3) floats in [0, 1] for output_type="np").

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


@dataclass(frozen=True)
class Request:
    """A checked generation request with its prompts encoded: what `prepare` makes and `sample` runs."""

    latents: torch.Tensor  # the initial noise (B, 12, T, H/8, W/8), fp32
    sigmas: list[float]  # num_steps + 1 noise levels, from 1 (pure noise) down to 0 (clean)
    guidance: list[float]  # one CFG scale per step
    cond: TextCondition  # the prompts
    uncond: TextCondition | None  # the negative prompts; None when no step uses guidance (all scales 1)
    seed: int | None  # see MochiOutput.seed
    noise_device: str | None = "cpu"  # see MochiOutput.noise_device


class MochiPipeline:
    """Text-to-video with Mochi 1: `pipe(prompt, num_frames=31).frames[0]`."""

    def __init__(
        self,
        dit: AsymmDiT,
        decoder: nn.Module,
        text_encoder: TextEncoder,
        device: str | torch.device | None = None,
        sources: dict | None = None,
        memory: str = "auto",
        mover: Mover | None = None,
    ):
        """Nothing moves to `device` here: the memory mode (`set_memory_mode`) places each component."""
        self.dit, self.decoder, self.text_encoder = dit, decoder, text_encoder
        self.sources = sources or {}  # the files each component came from (recorded in output sidecars)
        self.vae_options: dict = {"mode": "auto"}
        self.cp = None  # a distributed.ContextParallel once enable_context_parallel() ran
        # The VAE's per-channel latent (mean, std); None: the published constants. Models trained here bring theirs.
        self.latent_stats: tuple[list[float], list[float]] | None = None
        parts = {  # what each stage puts on the device: (module, the blocks sequential offload streams)
            "text_encoder": lambda: (self.text_encoder.model, _blocks(self.text_encoder)),
            "dit": lambda: (self.dit, _blocks(self.dit)),
            "decoder": lambda: (self.decoder, None),
        }
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory = DeviceMemory(parts, mover if mover is not None else Mover(device))
        self.last_batch_cfg: bool | None = None  # how the latest sampling ran its CFG branches (None: no CFG)
        self._plan_key: tuple | None = None  # the request the plan in force was made for
        self._shown: str | None = None  # the plan line printed last
        self.set_memory_mode(memory)

    # ---- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        text_encoder_path: str | Path | None = None,
        text_encoder_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        attention_backend: str = "auto",
        attention_chunk: int | None = None,
        fp8: str | None = None,
        context_parallel: bool = False,
        cfg_parallel: bool | None = None,
        shard_dit: bool = False,
        memory: str = "auto",
        mover: Mover | None = None,
    ) -> MochiPipeline:
        """Load from a native folder (dit/decoder.safetensors + a T5 folder), a diffusers folder, or a Hub repo id
        already in the local Hugging Face cache. Components load on the CPU; nothing goes to `device` until the memory
        mode places it (`memory`: "auto", "resident", "model", "sequential"; see `set_memory_mode`, which takes
        `mover` too). Out of device memory while placing the weights raises `DeviceMemoryError` with the mode to try.

        `attention_backend`: "auto" (flash-attn on a GPU that has it, else PyTorch SDPA), "sdpa", "flash", "sage";
        `attention_chunk`: SDPA query rows per call (default: 4096 on CPU, one call on GPU).
        `fp8`: keep the DiT blocks' weights in float8 e4m3 (half of bf16): "tensor" / "channel" quantize while
        loading (per-tensor / per-channel scales), "checkpoint" keeps a fp8 checkpoint's own weights and scales.
        `context_parallel`: join torchrun's process group and generate with all its ranks (see
        `enable_context_parallel`); with `shard_dit`, each rank reads and keeps only its share of the DiT's blocks.
        """
        memory = check_mode(memory)  # a typo, or a mode context parallelism cannot run, fails before the loading
        if context_parallel:
            from .distributed import check_compatible

            check_compatible(memory, True, shard_dit)
        folder = resolve_model_dir(path)
        check_model_dir(folder, text_encoder_path)
        t5_dir = Path(text_encoder_path) if text_encoder_path else find_text_encoder_dir(folder)
        cp = None
        if context_parallel:
            from .distributed import ContextParallel, init_distributed

            device = init_distributed(device=device)  # the backend follows the device (gloo on a CPU)
            cp = ContextParallel(cfg_parallel=cfg_parallel, device=device)
            device = cp.device
        with cp.guard() if cp is not None else nullcontext():  # a rank that cannot load stops the others
            if shard_dit:
                from .distributed import load_dit_sharded

                if fp8 is not None:
                    raise ValueError("fp8 weights and shard_dit do not combine yet; use one or the other")
                if cp is None:
                    raise ValueError("shard_dit needs context_parallel=True (several processes to share the blocks)")
                dit = load_dit_sharded(folder, cp, dtype=torch_dtype, attention_backend=attention_backend)
            else:
                dit = load_dit(folder, dtype=torch_dtype, attention_backend=attention_backend, fp8=fp8)
            decoder = load_vae_decoder(folder, dtype=vae_dtype or torch_dtype)
            text = TextEncoder.from_folder(t5_dir, dtype=text_encoder_dtype)
        dit.set_attention(attention_backend, attention_chunk)
        sources = {"model_dir": str(folder), "text_encoder": str(t5_dir)}
        pipe = cls(dit, decoder, text, device=device, sources=sources, mover=mover)
        pipe.latent_stats = load_latent_stats(folder)
        if cp is not None:
            pipe._use_context_parallel(cp)
        return pipe.set_memory_mode(memory)

    # ---- generation ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = 480,
        width: int = 848,
        num_frames: int = 31,
        num_inference_steps: int = 64,
        guidance_scale: float | Sequence[float] = 6.0,
        sigmas: Sequence[float] | None = None,
        threshold_noise: float = 0.025,
        linear_steps: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        batch_cfg: bool | str = "auto",
        progress: bool = True,
        dit_hook: DiTHook | None = None,
    ) -> MochiOutput:
        """Generate videos: `prepare`, `sample`, then `decode` (see each for its arguments).

        `output_type`: "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil" lists of images, or
        "latent" (the DiT's latents, not decoded). `progress`: a progress bar over the steps, and the memory plan
        on stderr (one line, when it changes). `batch_cfg`: see `sample`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        batch_cfg = check_batch_cfg(batch_cfg)
        self.memory.ledger.new_generation()
        timings, peaks = {}, {}
        with self._stage("text", timings, peaks):
            request = self.prepare(
                prompt,
                negative_prompt,
                height=height,
                width=width,
                num_frames=num_frames,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                sigmas=sigmas,
                threshold_noise=threshold_noise,
                linear_steps=linear_steps,
                seed=seed,
                generator=generator,
                latents=latents,
            )
        with self._stage("dit", timings, peaks):
            self._plan_request(request.latents.shape, request.uncond is not None, batch_cfg)
            self._announce(progress)
            latents = self.sample(request, batch_cfg, callback_on_step_end, dit_hook, progress)
        if output_type == "latent":
            report = dict(memory=self.memory_record(), batch_cfg=self.last_batch_cfg)
            return MochiOutput(latents, request.seed, timings, peaks, noise_device=request.noise_device, **report)
        with self._stage("vae", timings, peaks):
            frames = self.decode(latents, output_type)
        report = dict(memory=self.memory_record(), batch_cfg=self.last_batch_cfg)
        return MochiOutput(frames, request.seed, timings, peaks, noise_device=request.noise_device, **report)

    @torch.inference_mode()
    def prepare(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        height: int = 480,
        width: int = 848,
        num_frames: int = 31,
        num_inference_steps: int = 64,
        guidance_scale: float | Sequence[float] = 6.0,
        sigmas: Sequence[float] | None = None,
        threshold_noise: float = 0.025,
        linear_steps: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ) -> Request:
        """Check a request, make its initial noise and encode its prompts (with the negative ones when guided).

        `sigmas` replaces the linear-quadratic schedule (`threshold_noise`, `linear_steps`, `num_inference_steps`);
        `guidance_scale` is one scale or one per step. The noise comes from a CPU generator, so a seed gives the same
        video on any device: `generator`, else `seed`, else a random seed (reported as `Request.seed`); or pass
        `latents` (B, 12, T, H/8, W/8) to start from them. A CUDA `generator` draws on its device (other noise than
        a CPU one; `Request.noise_device` says which drew it); one on another device than the pipeline's is refused
        before the prompts are encoded.
        """
        if sigmas is not None:
            sigmas = check_sigmas(sigmas)
            num_inference_steps = len(sigmas) - 1
        Settings(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_frames=num_frames,
            seed=seed,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            threshold_noise=threshold_noise,
            linear_steps=linear_steps,
        ).check("api")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if sigmas is None:
            sigmas = linear_quadratic_schedule(num_inference_steps, threshold_noise, linear_steps)
        guidance = guidance_per_step(guidance_scale, len(sigmas) - 1)
        if self.cp is not None and seed is None and generator is None and latents is None:
            seed = self.cp.broadcast_object(secrets.randbits(SEED_BITS))  # every rank draws the same noise
        latents, seed, noise_device = initial_latents(
            len(prompts), num_frames, height, width, seed, generator, latents, device=self.device
        )

        guided = any(scale != 1.0 for scale in guidance)
        self._plan_request(latents.shape, guided, fresh=True)  # the memory plan for this size; weights placed
        text = self.encode_prompt(prompts + negatives if guided else prompts)
        n = len(prompts)
        uncond = text[n:] if guided else None
        return Request(latents, sigmas, guidance, text[:n], uncond, seed=seed, noise_device=noise_device)

    @torch.inference_mode()
    def sample(
        self,
        request: Request,
        batch_cfg: bool | str = "auto",
        callback_on_step_end: Callable | None = None,
        dit_hook: DiTHook | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """The Euler/CFG loop from the request's noise to the DiT's latents (B, 12, T, H/8, W/8), fp32.

        `batch_cfg`: both CFG branches in one DiT call (faster; twice the DiT's activations): True, False, or "auto"
        (batched when the memory plan has room for it; on a CPU device, when the activations fit the free RAM).
        `callback_on_step_end(pipe, i, sigma, {"latents": z})` runs after step i (sigma: the noise level reached);
        a dict it returns with "latents" replaces them. `dit_hook(call) -> velocity` wraps every DiT call
        (`sampling.DiTCall`). The DiT's per-generation tables are released at the end.
        """
        steps = len(request.sigmas) - 1
        guided = request.uncond is not None
        batch_cfg = self._plan_request(request.latents.shape, guided, check_batch_cfg(batch_cfg)).batch_cfg
        self.last_batch_cfg = batch_cfg if guided else None
        try:
            with (
                self._on_device(self.dit) as dit,
                self._after_each_step(steps, callback_on_step_end, progress) as after,
            ):
                if self.cp is not None and self.cp.cfg_group is not None and guided:
                    from .distributed import CFGParallelDiT

                    dit, batch_cfg = CFGParallelDiT(dit, self.cp), True  # each half of the ranks runs one branch
                    self.last_batch_cfg = True
                return denoise(
                    dit,
                    request.latents.to(self.device),
                    request.sigmas,
                    request.cond,
                    request.uncond,
                    request.guidance,
                    batch_cfg,
                    callback=after,
                    dit_hook=dit_hook,
                )
        finally:
            self._release_dit_tables()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """The DiT's latents -> videos: "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil".

        Out of memory, the decode frees what it held and tries once more with a smaller plan (`decode_frames`); if
        that runs out too, `DecodeMemoryError` carries the latents, so they are not lost. `last_decode_options`: the
        decode options that made the video (`vae_options`, or the smaller plan of the retry).
        """
        if output_type not in VIDEO_TYPES:
            raise ValueError(f"decode's output_type must be one of {VIDEO_TYPES}; got {output_type!r}")
        group = self.cp.group if self.cp is not None else None  # several processes: each decodes a time slice
        try:
            with self._on_device(self.decoder) as decoder:
                frames, self.last_decode_options = decode_frames(
                    decoder, latents, self.latent_stats, self.vae_options, group
                )
        except (torch.OutOfMemoryError, MemoryError) as e:  # moving the decoder to the device (offload modes)
            message = f"out of device memory moving the VAE decoder to {self.device} ({_first_line(e)})"
            raise DecodeMemoryError(message, latents.detach().cpu(), [dict(self.vae_options)]) from None
        return _convert(frames, output_type)

    def encode_prompt(self, prompts: list[str]) -> TextCondition:
        """T5 features and masks of `prompts`, on the pipeline's device."""
        with self._on_device(self.text_encoder) as t5:
            features, mask = t5.encode(prompts)
        return TextCondition(features.to(self.device), mask.to(self.device))

    def _denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """DiT space -> VAE space with this model's latent statistics (the published ones by default)."""
        return denormalize_latents(z, *(self.latent_stats or (None, None)))

    @contextmanager
    def _after_each_step(self, steps: int, callback: Callable | None, progress: bool):
        """The sampler's per-step callback: a progress bar, a NaN/inf guard, then the user's callback_on_step_end."""
        bar = tqdm(total=steps, desc="sampling", unit="step", disable=not (progress and self.is_main_process))

        def after(i: int, sigma: float, z: torch.Tensor) -> torch.Tensor | None:
            bar.update()
            if not torch.isfinite(z).all():
                raise NonFiniteLatentsError(
                    f"the latents became NaN or inf at step {i + 1} of {steps} (sigma {sigma:.4f}); no video was "
                    "written. Check the weights' dtype (T5 in fp16 overflows), or lower the guidance scale."
                )
            out = callback(self, i, sigma, {"latents": z}) if callback is not None else None
            return out.get("latents") if isinstance(out, dict) else None

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

    def to(self, device: str | torch.device) -> MochiPipeline:
        """Run on `device`; which weights live there is the memory mode's choice (resident: all, placed now; auto:
        decided at the next generation; the offload modes: each while it runs)."""
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
        """Drop T5's weights (about 19 GB in fp32) once the prompts you need are encoded."""
        self.memory.forget("text_encoder")
        self.text_encoder.unload()

    def _footprint(self, shape: tuple[int, ...] | None = None, guided: bool = True) -> Footprint:
        """What a generation of latents `shape` (B, 12, T, H, W) needs on the device (`offload.footprint`; default:
        one guided video of 31 frames at 848x480)."""
        shape = shape if shape is not None else (1, *MOCHI.latent_shape(31, 480, 848))
        ranks = self.cp.seq_size if self.cp is not None else 1
        t5_length = self.text_encoder.max_length
        return footprint(self.dit, self.decoder, self.text_encoder.model, shape, guided, t5_length, ranks)

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
        names = {id(self.text_encoder): "text_encoder", id(self.dit): "dit", id(self.decoder): "decoder"}
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
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, int | None, str | None]:
    """(noise, the seed that made it, the device that drew it): `latents` if given (their shape checked; no seed, no
    device), else noise from `generator` on its own device (no seed), else from `seed`, else from a random seed (both
    on the CPU).

    A generator on another device than `device` (the pipeline's) is refused here, before any work; a CPU generator
    is always fine (the noise then moves to the device)."""
    if latents is not None:
        expected = (batch, *MOCHI.latent_shape(num_frames, height, width))
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected} for this request; got {tuple(latents.shape)}")
        return latents, None, None
    if generator is not None:
        drawn_on = torch.device(generator.device)
        if drawn_on.type != "cpu" and device is not None and not _same_device(drawn_on, torch.device(device)):
            raise ValueError(
                f"the generator is on {drawn_on} but the pipeline runs on {torch.device(device)}: pass a generator "
                f"on {torch.device(device)} (torch.Generator({str(torch.device(device))!r})) or on the CPU "
                "(torch.Generator(), the default: the same noise on any device)"
            )
        noise = get_noise(batch, num_frames, height, width, generator=generator)
        return noise, None, str(noise.device)
    if seed is None:
        seed = secrets.randbits(SEED_BITS)
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
) -> tuple[torch.Tensor, dict]:
    """The DiT's latents (B, 12, T, H, W) -> (frames (B, T', H', W', 3) in [0, 1] on the decoder's device, the decode
    options used), with the VAE's latent statistics (None: the published ones) and `vae.decode`'s options.

    When memory runs out (`torch.OutOfMemoryError`, or `MemoryError`: no plan fits the budget), what the attempt held
    is released and the decode runs once more with `smaller_vae_options` (in one process; the ranks of a time split
    would have to retry together). If that fails too, `DecodeMemoryError` carries the latents (on the CPU).
    """
    options = dict(vae_options or {"mode": "auto"})
    z = denormalize_latents(latents, *(latent_stats or (None, None)))
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


def _convert(frames: torch.Tensor, output_type: str):
    """(B, T, H, W, 3) floats in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return frames.permute(0, 1, 4, 2, 3).cpu()  # (B, T, 3, H, W), as diffusers
    array = frames.cpu().numpy().astype(np.float32)
    if output_type == "np":
        return array
    from PIL import Image

    return [[Image.fromarray((f * 255).astype(np.uint8)) for f in video] for video in array]


# ---- model folders -----------------------------------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """A local folder as it is; an `org/name` Hub id through the local Hugging Face cache (no download)."""
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
            return Path(snapshot_download(str(path), local_files_only=True))
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(
                f"{path} is not a local folder and not in the local Hugging Face cache; download it first "
                f"(`huggingface-cli download {path}`) or pass the folder that holds the weights"
            ) from e
    raise FileNotFoundError(f"model folder not found: {p}")


def check_model_dir(folder: Path, text_encoder_path: str | Path | None = None) -> None:
    """Name every missing part of a model folder at once, with what each layout expects."""
    missing = []
    if not ((folder / "dit.safetensors").is_file() or (folder / "transformer").is_dir()):
        missing.append("the DiT (dit.safetensors, or transformer/)")
    if not ((folder / "decoder.safetensors").is_file() or (folder / "vae").is_dir()):
        missing.append("the VAE decoder (decoder.safetensors, or vae/)")
    if text_encoder_path is None:
        try:
            find_text_encoder_dir(folder)
        except FileNotFoundError:
            missing.append("the T5 text encoder (text_encoder/ + tokenizer/, or t5/; or pass --t5_dir)")
    if missing:
        raise FileNotFoundError(
            f"{folder} is missing {'; '.join(missing)}. A native folder holds dit.safetensors, decoder.safetensors "
            "(encoder.safetensors optional) and a T5 folder; a diffusers folder holds transformer/, vae/, "
            "text_encoder/ and tokenizer/."
        )


def find_text_encoder_dir(folder: Path) -> Path:
    """The T5 inside a model folder: diffusers' text_encoder/ + tokenizer/, or a t5/ subfolder (native layout)."""
    for candidate in (folder, folder / "t5", folder / "t5-v1_1-xxl"):
        if (candidate / "text_encoder").is_dir() or (candidate is not folder and (candidate / "config.json").is_file()):
            return candidate
    raise FileNotFoundError(
        f"no T5 text encoder in {folder}: expected {folder / 'text_encoder'} and {folder / 'tokenizer'} "
        f"(diffusers layout) or {folder / 't5'} (a google/t5-v1_1-xxl download); or pass its folder with "
        "--t5_dir / text_encoder_path="
    )
