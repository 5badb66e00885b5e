"""MochiPipeline: prompt -> T5 -> Euler/CFG sampling with the DiT -> VAE decode -> frames.

`pipe(prompt, ...)` is three steps, each callable on its own:

    request = pipe.prepare(prompt, ...)  # check the settings, draw the initial noise, encode the prompts
    latents = pipe.sample(request)       # the Euler/CFG loop with the DiT (sampling.denoise)
    frames = pipe.decode(latents)        # the VAE decoder, then frames in [0, 1]

Hooks: `callback_on_step_end(pipe, i, sigma, {"latents": z})` runs after each step and may return {"latents": new};
`dit_hook(call)` wraps each DiT call (a `sampling.DiTCall`) and returns its velocity: it may count calls, return a
cached velocity instead of running the DiT, or run it on edited inputs (`call(latents=..., text=...)`).

Memory modes: everything resident (default); `enable_model_cpu_offload()` keeps each component on the CPU and
moves it to the device only while it runs; `enable_sequential_cpu_offload()` also streams the DiT's blocks to the
device one at a time, so the DiT never has to fit at once; `enable_vae_tiling()` decodes in tiles and time chunks.
Several processes: `enable_context_parallel()` (or `from_pretrained(..., context_parallel=True)` under torchrun) makes
every rank of a process group work on each video (see `distributed.py`).
"""

from __future__ import annotations

import secrets
import time
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

VIDEO_TYPES = ("np", "pt", "pil")  # what `decode` makes
OUTPUT_TYPES = (*VIDEO_TYPES, "latent")
SEED_BITS = 53  # random seeds stay exact as JSON numbers read by JavaScript (the web UI) and as float64


class NonFiniteLatentsError(RuntimeError):
    """The sampler produced NaN or inf: nothing is decoded or written."""


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory; the message suggests the memory modes that would fit."""


@dataclass
class MochiOutput:
    """Videos: `frames[0]` is the first video ((T, H, W, 3) floats in [0, 1] for output_type="np").

    `seed` made the initial noise: the one given, or the one drawn when neither a seed, a generator nor latents were
    given; None when the noise came from a generator or from given latents.
    """

    frames: object
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A checked generation request with its prompts encoded: what `prepare` makes and `sample` runs."""

    latents: torch.Tensor  # the initial noise (B, 12, T, H/8, W/8), fp32
    sigmas: list[float]  # num_steps + 1 noise levels, from 1 (pure noise) down to 0 (clean)
    guidance: list[float]  # one CFG scale per step
    cond: TextCondition  # the prompts
    uncond: TextCondition | None  # the negative prompts; None when no step uses guidance (all scales 1)
    seed: int | None  # see MochiOutput.seed


class MochiPipeline:
    """Text-to-video with Mochi 1: `pipe(prompt, num_frames=31).frames[0]`."""

    def __init__(
        self,
        dit: AsymmDiT,
        decoder: nn.Module,
        text_encoder: TextEncoder,
        device: str | torch.device | None = None,
        sources: dict | None = None,
    ):
        self.dit, self.decoder, self.text_encoder = dit, decoder, text_encoder
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.sources = sources or {}  # the files each component came from (recorded in output sidecars)
        self.offload = "none"  # "none" | "model" | "sequential"
        self.vae_options: dict = {"mode": "auto"}
        self._hooks: list = []
        self.cp = None  # a distributed.ContextParallel once enable_context_parallel() ran
        # The VAE's per-channel latent (mean, std); None: the published constants. Models trained here bring theirs.
        self.latent_stats: tuple[list[float], list[float]] | None = None
        self._place()

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
    ) -> MochiPipeline:
        """Load from a native folder (dit/decoder.safetensors + a T5 folder), a diffusers folder, or a Hub repo id
        already in the local Hugging Face cache. Components load on the CPU, then move to `device`.

        `attention_backend`: "auto" (flash-attn on a GPU that has it, else PyTorch SDPA), "sdpa", "flash", "sage";
        `attention_chunk`: SDPA query rows per call (default: 4096 on CPU, one call on GPU).
        `fp8`: keep the DiT blocks' weights in float8 e4m3 (half of bf16): "tensor" / "channel" quantize while
        loading (per-tensor / per-channel scales), "checkpoint" keeps a fp8 checkpoint's own weights and scales.
        `context_parallel`: join torchrun's process group and generate with all its ranks (see
        `enable_context_parallel`); with `shard_dit`, each rank reads and keeps only its share of the DiT's blocks.
        """
        folder = resolve_model_dir(path)
        check_model_dir(folder, text_encoder_path)
        t5_dir = Path(text_encoder_path) if text_encoder_path else find_text_encoder_dir(folder)
        cp = None
        if context_parallel:
            from .distributed import ContextParallel, init_distributed

            init_distributed()
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
        pipe = cls(dit, decoder, text, device=device, sources=sources)
        pipe.latent_stats = load_latent_stats(folder)
        return pipe._use_context_parallel(cp) if cp is not None else pipe

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
        batch_cfg: bool = False,
        progress: bool = True,
        dit_hook: DiTHook | None = None,
    ) -> MochiOutput:
        """Generate videos: `prepare`, `sample`, then `decode` (see each for its arguments).

        `output_type`: "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil" lists of images, or
        "latent" (the DiT's latents, not decoded). `progress`: a progress bar over the steps.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
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
            latents = self.sample(request, batch_cfg, callback_on_step_end, dit_hook, progress)
        if output_type == "latent":
            return MochiOutput(frames=latents, seed=request.seed, timings=timings, peak_memory=peaks)
        with self._stage("vae", timings, peaks):
            frames = self.decode(latents, output_type)
        return MochiOutput(frames=frames, seed=request.seed, timings=timings, peak_memory=peaks)

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
        `latents` (B, 12, T, H/8, W/8) to start from them.
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
        latents, seed = initial_latents(len(prompts), num_frames, height, width, seed, generator, latents)

        guided = any(scale != 1.0 for scale in guidance)
        text = self.encode_prompt(prompts + negatives if guided else prompts)
        n = len(prompts)
        return Request(latents, sigmas, guidance, cond=text[:n], uncond=text[n:] if guided else None, seed=seed)

    @torch.inference_mode()
    def sample(
        self,
        request: Request,
        batch_cfg: bool = False,
        callback_on_step_end: Callable | None = None,
        dit_hook: DiTHook | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """The Euler/CFG loop from the request's noise to the DiT's latents (B, 12, T, H/8, W/8), fp32.

        `batch_cfg`: both CFG branches in one DiT call (more memory). `callback_on_step_end(pipe, i, sigma,
        {"latents": z})` runs after step i (sigma: the noise level reached); a dict it returns with "latents"
        replaces them. `dit_hook(call) -> velocity` wraps every DiT call (`sampling.DiTCall`).
        """
        steps = len(request.sigmas) - 1
        with self._on_device(self.dit) as dit, self._after_each_step(steps, callback_on_step_end, progress) as after:
            if self.cp is not None and self.cp.cfg_group is not None and request.uncond is not None:
                from .distributed import CFGParallelDiT

                dit, batch_cfg = CFGParallelDiT(dit, self.cp), True  # each half of the ranks runs one branch
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

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """The DiT's latents -> videos: "np" (B, T, H, W, 3) floats in [0, 1], "pt" (B, T, 3, H, W), "pil"."""
        if output_type not in VIDEO_TYPES:
            raise ValueError(f"decode's output_type must be one of {VIDEO_TYPES}; got {output_type!r}")
        group = self.cp.group if self.cp is not None else None  # several processes: each decodes a time slice
        with self._on_device(self.decoder) as decoder:
            video = vae_decode(decoder, self._denormalize(latents), group=group, **self.vae_options)  # (B, 3, T, H, W)
        frames = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 4, 1)  # [-1, 1] -> (B, T, H, W, 3)
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
        from .distributed import shard_dit as shard

        if self.offload == "sequential":
            raise ValueError("sequential CPU offload and context parallelism do not mix; use shard_dit instead")
        if self.dit.cfg.num_heads % cp.seq_size:
            raise ValueError(
                f"{cp.seq_size} ranks per CFG half do not divide the DiT's {self.dit.cfg.num_heads} heads; use a "
                f"rank count whose half (with CFG parallelism) or whole divides {self.dit.cfg.num_heads}"
            )
        self.cp = cp
        self.dit.set_token_layout(cp.token_layout())
        if shard_dit:
            shard(self.dit, cp)
        return self

    @property
    def is_main_process(self) -> bool:
        """Whether this process should write files and report: rank 0, or the only process."""
        return self.cp is None or self.cp.is_main

    # ---- memory modes --------------------------------------------------------------------------------------

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> MochiPipeline:
        """Keep every component on the CPU; each moves to the device only while it runs."""
        return self._set_offload("model", device)

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> MochiPipeline:
        """Like model offload, and DiT and T5 blocks stream to the device one by one (neither has to fit at once)."""
        return self._set_offload("sequential", device)

    def disable_cpu_offload(self) -> MochiPipeline:
        return self._set_offload("none", None)

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
        self.text_encoder.unload()

    def _set_offload(self, mode: str, device) -> MochiPipeline:
        if device is not None:
            self.device = torch.device(device)
        for h in self._hooks:
            h.remove()
        self._hooks, self.offload = [], mode
        self._place()
        return self

    def _place(self) -> None:
        if self.offload == "none":
            for part in (self.dit, self.decoder, self.text_encoder):
                part.to(self.device)
        else:
            for part in (self.dit, self.decoder, self.text_encoder):
                part.to("cpu")
            if self.offload == "sequential":
                self._hooks = [
                    h for part in (self.dit, self.text_encoder) for h in _stream_blocks(_blocks(part), self.device)
                ]

    @contextmanager
    def _on_device(self, part):
        """Run `part` on the device; in offload modes it goes back to the CPU afterwards."""
        if self.offload == "none":
            yield part
            return
        if self.offload == "sequential" and (blocks := _blocks(part)) is not None:
            # Everything but the blocks (embedders, final layers: small) moves now; blocks stream through hooks.
            in_blocks = {id(t) for t in (*blocks.parameters(), *blocks.buffers())}
            module = part if isinstance(part, nn.Module) else part.model
            for t in (*module.parameters(), *module.buffers()):
                if id(t) not in in_blocks:
                    t.data = t.data.to(self.device)
        else:
            part.to(self.device)
        try:
            yield part
        finally:
            part.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @contextmanager
    def _stage(self, name: str, timings: dict, peaks: dict):
        """Time a stage and record the device's peak memory during it; turn device OOM into advice."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            with self.cp.guard() if self.cp is not None else nullcontext():  # one rank failing stops them all
                yield
        except torch.OutOfMemoryError as e:
            raise DeviceMemoryError(self._oom_advice(name)) from e
        timings[name] = time.perf_counter() - start
        peaks[name] = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else _peak_rss()

    def _oom_advice(self, stage: str) -> str:
        tips = []
        if self.offload == "none":
            tips.append("enable_model_cpu_offload() (--cpu_offload)")
        if self.offload != "sequential":
            tips.append("enable_sequential_cpu_offload() (--sequential_offload)")
        if stage == "vae" and self.vae_options.get("mode") != "tiled":
            tips.append("enable_vae_tiling() (--vae_tiling on)")
        if stage == "dit":
            tips.append("fewer frames or a smaller size, or batch_cfg=False")
        return f"out of device memory during the {stage} stage; nothing was written. Try: " + "; ".join(tips)


def initial_latents(
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int | None]:
    """(noise, the seed that made it): `latents` if given (their shape checked; no seed), else noise from
    `generator` (no seed), else from `seed`, else from a random seed."""
    if latents is not None:
        expected = (batch, *MOCHI.latent_shape(num_frames, height, width))
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected} for this request; got {tuple(latents.shape)}")
        return latents, None
    if generator is not None:
        return get_noise(batch, num_frames, height, width, generator=generator), None
    if seed is None:
        seed = secrets.randbits(SEED_BITS)
    return get_noise(batch, num_frames, height, width, seed=seed), seed


def _stream_blocks(blocks: nn.ModuleList, device: torch.device) -> list:
    """Move each block to `device` just before it runs and back to the CPU right after."""

    def load(module, args):
        module.to(device)

    def unload(module, args, output):
        module.to("cpu")

    return [h for b in blocks for h in (b.register_forward_pre_hook(load), b.register_forward_hook(unload))]


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
