"""Command line: `python -m mochi_preview.infer --prompt ... [--model_dir DIR]` (also installed as `mochi`).

Writes `<out_dir>/output_<timestamp>.mp4` (H.264, yuv420p) and a JSON sidecar with every setting, so any video can be
regenerated. Everything is checked before any weights load; the output's name is claimed when the run starts and the
video and sidecar are published together at the end, or nothing is (see outputs.py); existing files are never
overwritten. Ctrl-C (exit 130) and SIGTERM (143) leave nothing behind. On a machine with several GPUs the command
runs itself under torch's elastic launcher, one process per GPU (see launch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, launch, outputs
from . import conditioning as pixels_in
from . import settings as table
from .distributed import RankFailedError, check_compatible, launched_world_size
from .geometry import MOCHI
from .latents_file import decode_command, latent_stats_of, latents_path_for, load_latents, save_latents
from .outputs import estimated_bytes, new_output_path
from .pipeline import (
    SEED_BITS,
    DecodeMemoryError,
    DeviceMemoryError,
    MochiPipeline,
    NonFiniteLatentsError,
    decode_frames,
    resolve_model_dir,
)
from .preview import Previewer, write_png
from .sampling import PRESETS
from .settings import Settings, model_defaults
from .video import encode_video, frames_digest, stream_digest

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PREVIEW_EVERY = 4  # --preview_every's default: steps between preview images


@dataclass(frozen=True)
class RunOptions:
    """How a video is made and written, apart from its settings (so not part of a sweep line's digest)."""

    fps: float = 30  # frame rate of the MP4
    batch_cfg: bool | str = "auto"  # both CFG branches in one batch: True, False, "auto" (when memory allows)
    progress: bool = True  # a progress bar on stderr
    save_latents: Path | None = None  # also write the finished latents there, before the decode (a latents file)
    preview: Path | None = None  # a PNG rewritten every `preview_every` steps while sampling (preview.py)
    preview_every: int = PREVIEW_EVERY

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(
            fps=args.fps,
            batch_cfg={"auto": "auto", "on": True, "off": False}[args.batch_cfg],
            progress=not args.quiet,
            save_latents=getattr(args, "save_latents", None),
            preview=getattr(args, "preview", None),
            preview_every=getattr(args, "preview_every", PREVIEW_EVERY),
        )


def describe_files(folder: Path) -> dict:
    """Model files with their sizes (and mtimes): enough to tell which weights made a video without hashing GBs."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".model"):
            stat = p.stat()
            out[str(p.relative_to(folder))] = {"bytes": stat.st_size, "mtime": int(stat.st_mtime)}
    return out


def build_parser(defaults: Settings | None = None) -> argparse.ArgumentParser:
    """The CLI's flags; their help shows `defaults` (the model's, see `help_defaults`), else the table's."""
    p = argparse.ArgumentParser(prog="mochi", description="Generate a video with Mochi 1 preview.")
    table.add_arguments(p, defaults)  # --prompt, --width, --cfg_scale, --num_steps ...: from the settings table
    p.add_argument("--model_dir", type=Path, help="weights folder (native or diffusers layout) or a cached Hub id")
    p.add_argument(
        "--t5_dir",
        help="T5 folder or Hub id in the local cache, if not inside --model_dir (default: the folder's, else "
        "google/t5-v1_1-xxl from the cache, as Genmo's code reads it)",
    )
    p.add_argument(
        "--verify", action="store_true", help="check the weight files' SHA-256 against the folder's manifest first"
    )
    p.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="DiT/VAE (auto: bf16 GPU, fp32 CPU)"
    )
    p.add_argument("--t5_dtype", choices=sorted(DTYPES), default="fp32", help="T5 weights (default fp32)")
    p.add_argument(
        "--vae_dtype", choices=sorted(DTYPES), default="fp32", help="VAE decoder (default fp32, as Genmo decodes)"
    )
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
    p.add_argument(
        "--gpus",
        type=int,
        help="processes, one per GPU, under torch's elastic launcher (default: every GPU when there are several; "
        "1: one process; with --device cpu, N CPU processes)",
    )
    p.add_argument(
        "--memory",
        choices=["auto", "resident", "model", "sequential"],
        help="where the weights live: auto (default: the first that fits the free device memory), resident (all "
        "on the device), model (each on the device while it runs), sequential (also stream DiT blocks that do not fit)",
    )
    p.add_argument("--cpu_offload", action="store_true", help="= --memory model (one model on the device at a time)")
    p.add_argument("--sequential_offload", action="store_true", help="= --memory sequential (the least device memory)")
    p.add_argument("--vae_tiling", choices=["auto", "on", "off"], default="auto", help="tiled VAE decoding")
    p.add_argument(
        "--attention",
        choices=["auto", "sdpa", "flash", "sage"],
        default="auto",
        help="attention kernel (auto: flash-attn for fp16/bf16 on a GPU of compute capability >= 8.0 once a test "
        "call passes, else PyTorch SDPA)",
    )
    p.add_argument("--attention_chunk", type=int, help="SDPA query rows per call (default: 4096 on CPU, all on GPU)")
    p.add_argument(
        "--fp8",
        choices=["tensor", "channel", "checkpoint"],
        help="DiT block weights in float8 (half of bf16): quantize per tensor / per channel, or keep a fp8 file's",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT and VAE blocks (slow first run)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named sampling recipe under the flags: fast = FastMochi's (8 steps, CFG 1.5, pcm_linear_quadratic)",
    )
    p.add_argument(
        "--lora_path",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a LoRA (Genmo, diffusers/peft or ComfyUI format) merged into the DiT at startup; repeatable; strength "
        "default 1 (with --fp8 applied live)",
    )
    p.add_argument(
        "--batch_cfg",
        nargs="?",
        const="on",
        default="auto",
        choices=["auto", "on", "off"],
        help="both CFG branches in one batch (faster, twice the DiT's activations); alone: on; default auto (when "
        "memory allows)",
    )
    p.add_argument(
        "--cfg_parallel", choices=["auto", "on", "off"], default="auto", help="torchrun: CFG branches on rank halves"
    )
    p.add_argument("--shard_dit", action="store_true", help="torchrun: each rank keeps only its share of DiT blocks")
    p.add_argument("--out_dir", type=Path, default=Path("outputs"), help="where videos go (default outputs/)")
    p.add_argument("--output", type=Path, help="exact output path (.mp4); refused if it exists")
    p.add_argument("--fps", type=_positive, default=30, help="frame rate of the MP4 (default 30)")
    p.add_argument("--sweep-file", dest="sweep_file", type=Path, help="JSONL: one generation per line, resumable")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes: only warnings, errors, the result")
    p.add_argument(
        "--save_latents",
        type=Path,
        metavar="PATH",
        help="also write the finished latents to PATH (.safetensors, with what decoding them needs) before decoding",
    )
    p.add_argument(
        "--preview",
        type=Path,
        metavar="PATH",
        help="a PNG of the predicted video (a few frames, from a cheap latent -> RGB projection), rewritten every "
        "--preview_every steps while sampling",
    )
    p.add_argument(
        "--preview_every",
        type=int,
        default=PREVIEW_EVERY,
        metavar="N",
        help=f"steps between --preview images (default {PREVIEW_EVERY}; the last step always writes one)",
    )
    p.add_argument(
        "--decode_latents",
        type=Path,
        metavar="PATH",
        help="decode a latents file (from --save_latents, or left by a decode that ran out of memory) into its MP4 "
        "and sidecar; loads only the VAE decoder",
    )
    return p


def _positive(text: str) -> float:
    """--fps: a positive number (a whole one stays an int)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}")
    return int(value) if value.is_integer() else value


def help_defaults(argv: Sequence[str]) -> Settings | None:
    """For --help: the settings of the model the command will use (the demo model's without --model_dir); None
    when there is no --help or the folder cannot be read (the help then shows the table's defaults)."""
    if "-h" not in argv and "--help" not in argv:
        return None
    from .tiny import demo_model_dir

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model_dir")
    model_dir = pre.parse_known_args(argv)[0].model_dir
    try:  # without --model_dir and without the demo model, the table's (the random stand-in is not made for --help)
        folder = resolve_model_dir(model_dir) if model_dir is not None else demo_model_dir()
        return cli_defaults(folder) if folder is not None else None
    except (ValueError, OSError):
        return None


def is_demo(model_dir: Path) -> bool:
    from .tiny import DEMO_MODEL_DIR

    return Path(model_dir).resolve() == DEMO_MODEL_DIR.resolve()


def cli_defaults(model_dir: Path, preset: str | None = None) -> Settings:
    """The settings a run starts from: the model folder's defaults (for the demo model, a prompt it can draw), then
    a named sampling recipe (`sampling.PRESETS`, e.g. "fast": FastMochi's 8 steps); the flags go on top."""
    d = model_defaults(model_dir)
    if is_demo(model_dir) and d.prompt == table.DEFAULT_PROMPT:
        from .demo.vocabulary import DEMO_PROMPT

        d = replace(d, prompt=DEMO_PROMPT)
    if preset is not None:
        d = d.updated(PRESETS[preset], "file", where=f"--preset {preset}")
    return d


def fit_to_inputs(args: argparse.Namespace, runs: list[Settings], model_dir: Path) -> list[Settings]:
    """Each run's --image / --init_video / --extend file checked from its header before any weights load (missing,
    unreadable, too small, too short, of another size), with a video's size (and, for --init_video, its usable
    frame count) filling what the flags leave unset; and the VAE encoder the inputs need looked for."""
    fitted = []
    for s in runs:
        if (given := pixels_in.given_input(s.image, s.video, s.extend)) is None:
            fitted.append(s)
            continue
        kind, path = given
        flag = pixels_in.FLAGS[kind]
        width, height, frames = pixels_in.probe(kind, path)
        try:
            if kind == "image":
                pixels_in.check_image_size(width, height, s.height, s.width)
            else:
                size = {k: v for k, v in (("width", width), ("height", height)) if getattr(args, k) is None}
                if kind == "video" and args.num_frames is None:
                    size["num_frames"] = MOCHI.num_frames(MOCHI.latent_frames(max(frames, 1)))
                s = replace(s, **size)
                used = pixels_in.check_video_shape(frames, height, width, s.height, s.width)
                if kind == "video" and s.num_frames > used:
                    raise ValueError(f"--num_frames {s.num_frames} but the video has {used} usable frames")
        except ValueError as e:
            raise ValueError(f"{flag} {path}: {e}") from None
        fitted.append(s.check("cli"))
    if any(pixels_in.given_input(s.image, s.video, s.extend) for s in fitted):
        if not ((model_dir / "encoder.safetensors").is_file() or (model_dir / "vae").is_dir()):
            raise FileNotFoundError(
                f"--image, --init_video and --extend need the VAE encoder: {model_dir} has no encoder.safetensors "
                "(or vae/)"
            )
    return fitted


def read_sweep(path: Path, base: Settings) -> list[Settings]:
    """One checked Settings per non-empty JSONL line (file names: cfg_scale, num_steps ...); an unknown key or a bad
    value stops everything, naming the line: a sweep is checked whole before any weights load."""
    runs = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--sweep-file {path}: cannot read it ({e})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        try:
            runs.append(base.updated(entry, "file").check("file"))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return runs


def available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(name: str | None) -> None:
    """ValueError naming --device and the devices there are, for a device this machine does not have."""
    if name is None:
        return
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name; available here: {', '.join(available)}") from None
    if device.type == "cpu":
        return
    if device.type == "cuda" and device.index is None and any(d.startswith("cuda") for d in available):
        return
    if str(device) not in available:
        raise ValueError(f"--device {name}: not available on this machine; available here: {', '.join(available)}")


def resolve_dtype(name: str, device: str | None) -> torch.dtype:
    """bf16 where it is fast (GPUs), fp32 on CPUs, where bf16 convolutions are slow; or what was asked."""
    if name != "auto":
        return DTYPES[name]
    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return torch.bfloat16 if on_gpu else torch.float32


def find_model_dir(model_dir: str | Path | None) -> Path:
    """The model folder to use (no weights are read): `model_dir` (a folder or a cached Hub id), else the default."""
    if model_dir is None:
        from .tiny import default_model_dir

        model_dir = default_model_dir()
    return resolve_model_dir(model_dir)


def memory_mode(args: argparse.Namespace) -> str:
    """The memory mode the flags ask for: --memory, or the offload flags (the model card's --cpu_offload is
    "model", --sequential_offload "sequential", which wins when both are given); "auto" by default."""
    flags = [m for m, on in (("sequential", args.sequential_offload), ("model", args.cpu_offload)) if on]
    if args.memory is not None and flags and flags[0] != args.memory:
        raise ValueError(f"--memory {args.memory} contradicts --{'cpu' if flags[0] == 'model' else flags[0]}_offload")
    return args.memory or (flags[0] if flags else "auto")


def lora_arguments(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """--lora_path values as (path, strength), each file's header checked (exists, safetensors, a known LoRA layout):
    cheap, so it runs before any weights load; the shapes are checked against the DiT when it is applied."""
    from .lora import check_lora_file, parse_lora_arg

    loras = []
    for text in args.lora_path:
        path, strength = parse_lora_arg(text)
        try:
            check_lora_file(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"--lora_path {text}: {e}") from None
        loras.append((path, strength))
    return loras


def load_pipeline(args: argparse.Namespace, model_dir: Path | None = None) -> tuple[MochiPipeline, Path]:
    """The pipeline the flags ask for, from `model_dir` (default: found from --model_dir); the slow part."""
    model_dir = model_dir if model_dir is not None else find_model_dir(args.model_dir)
    memory = memory_mode(args)
    parallel = launched_world_size() > 1  # started by torchrun with several processes: all work on each video
    if args.shard_dit and not parallel:
        raise ValueError("--shard_dit shares the DiT between processes: run under torchrun --nproc_per_node=N")
    check_compatible(memory, parallel, args.shard_dit)  # before the weights load
    pipe = MochiPipeline.from_pretrained(
        model_dir,
        torch_dtype=resolve_dtype(args.dtype, args.device),
        device=args.device,
        text_encoder_path=args.t5_dir,
        verify_hashes=args.verify,
        text_encoder_dtype=DTYPES[args.t5_dtype],
        vae_dtype=DTYPES[args.vae_dtype],
        attention_backend=args.attention,
        attention_chunk=args.attention_chunk,
        fp8=args.fp8,
        context_parallel=parallel,
        cfg_parallel={"auto": None, "on": True, "off": False}[args.cfg_parallel],
        shard_dit=args.shard_dit,
        memory=memory,
    )
    for path, strength in lora_arguments(args):
        pipe.load_lora_weights(path, strength=strength)
    if args.lora_path and args.fp8 is None:
        pipe.fuse_lora()  # merged in fp32, then cast: no per-step cost (fp8 weights keep them live)
    if args.compile:
        pipe.compile()
    if args.vae_tiling == "on":
        pipe.enable_vae_tiling()
    elif args.vae_tiling == "off":
        pipe.disable_vae_tiling()
    return pipe, Path(pipe.sources["model_dir"])


def generate(
    pipe: MochiPipeline,
    settings: Settings,
    output: Path | None,
    options: RunOptions = RunOptions(),  # frozen: a shared default is safe
    callback=None,
    on_frames=None,
) -> Path | None:
    """Generate one video to `output` (an .mp4 path, + a `.json` sidecar), published together (outputs.py).

    `settings` are checked by the pipeline (callers that can, check them earlier, before loading weights);
    `seed=None` draws a random seed, which the sidecar records. `callback`: the pipeline's callback_on_step_end.
    `on_frames(frames)`: called with the video's frames (T, H, W, 3) once it is published (the web UI's display copy).
    `output` is claimed here unless `new_output_path` claimed it; any exception (KeyboardInterrupt too, or one
    `callback` raises) leaves no file behind and gives the name back. Under torchrun every rank generates and only
    rank 0 writes (the others pass None and get None).

    `options.save_latents`: the finished latents are also written there (a latents file) before the decode. When the
    decode runs out of memory, also with a smaller plan, the latents are written (there, or beside `output`) and the
    `DecodeMemoryError` names the file and the command that decodes it: nothing is lost.
    """
    if settings.seed is None:  # drawn here, so that a latents file written before the decode records it
        settings = replace(settings, seed=secrets.randbits(SEED_BITS))
    claim = outputs.claim_for(output) if output is not None and pipe.is_main_process else None
    size = estimated_bytes(settings.num_frames, settings.height, settings.width)
    try:
        if claim is not None:
            outputs.check_space(claim.path.parent, size, "the output folder")
        out = _sample_and_decode(pipe, settings, output, options, callback)
        if claim is None:
            return None
        seed = getattr(out, "seed", None)  # the seed the pipeline used (drawn when settings.seed is None)
        if seed is None:
            seed = settings.seed
        record = run_record(pipe, settings, options, seed, getattr(out, "noise_device", "cpu"))
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        frames = out.frames[0]
        record.update(seconds=out.timings, peak_memory_bytes=out.peak_memory, created=created)
        record.update(frames_digest=frames_digest(frames))
        if getattr(out, "conditioning", None) is not None:  # the input file (name, bytes, sha256) and what was done
            record["conditioning"] = out.conditioning
            record["sigmas"] = out.conditioning.get("sigmas", record["sigmas"])  # video to video: the cut schedule
        if getattr(out, "cache", None) is not None:  # which DiT calls the step cache computed and reused
            record["cache_steps"] = out.cache
        outputs.check_space(claim.path.parent, size, "the output folder")  # again: the run may have taken hours
        video = claim.publish(
            lambda tmp: encode_video(frames, tmp, options.fps, metadata={"mochi": json.dumps(record)}),
            lambda tmp: {**record, "stream_digest": stream_digest(tmp)},
        )
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if on_frames is not None:
        on_frames(frames)
    summary = ", ".join(f"{k} {v:.1f} s / {out.peak_memory.get(k, 0) / 2**30:.2f} GiB" for k, v in out.timings.items())
    print(f"wrote {video} ({summary})", file=sys.stderr)  # the one line --quiet keeps: the result
    return video


def _sample_and_decode(pipe: MochiPipeline, settings: Settings, output: Path | None, options: RunOptions, callback):
    """The pipeline's output for `settings`, with the latents kept in a file when the decode runs out of memory."""
    saved: list[Path] = []
    main_process = pipe.is_main_process
    show = main_process and options.progress
    previewer = None
    if options.preview is not None and main_process:  # fitted now: the decoder never runs in the middle of sampling
        previewer = Previewer(lambda image: write_png(options.preview, image), options.preview_every).prepare(pipe)
    last_step = len(settings.sigmas) - 2

    def on_step(p, i, sigma, state):
        out = callback(p, i, sigma, state) if callback is not None else None
        replaced = out.get("latents") if isinstance(out, dict) else None
        z = state["latents"] if replaced is None else replaced  # what the next step (or the decoder) gets
        if previewer is not None:
            previewer(p, i, sigma, {**state, "latents": z})
        if i == last_step and options.save_latents is not None and main_process:
            saved.append(save_latents(options.save_latents, z, latents_metadata(pipe, settings, options)))
            print(f"wrote {saved[-1]} (the latents)", file=sys.stderr)
        if i == last_step and show:
            # above the sampling bar, which closes after this last callback
            tqdm.write("decoding: the VAE turns the latents into frames", file=sys.stderr)
        return out

    if show:
        print("text: encoding the prompt" + (" and the input" if pixels_in.given_input(settings.image,
              settings.video, settings.extend) else ""), file=sys.stderr)  # fmt: skip

    try:
        return pipe(
            **settings.pipeline_kwargs(),
            batch_cfg=options.batch_cfg,
            progress=options.progress,
            callback_on_step_end=on_step,
        )
    except DecodeMemoryError as e:
        if not pipe.is_main_process:
            raise
        path = saved[0] if saved else None
        if path is None:
            path = save_latents(_unused(latents_path_for(output)), e.latents, latents_metadata(pipe, settings, options))
        command = decode_command(path, pipe.sources["model_dir"])
        kept = f"{path}; decode them with:\n  {command}\n(add --vae_tiling on, or --device cpu, if memory stays short)"
        raise DecodeMemoryError(e.reason, e.latents, e.attempts, kept=kept) from None


def run_record(
    pipe: MochiPipeline, settings: Settings, options: RunOptions, seed: int, noise_device: str | None = "cpu"
) -> dict:
    """The sidecar of a run, in its order, with empty "seconds", "peak_memory_bytes" and "created" (the caller's)."""
    sigmas = settings.sigmas
    scale = settings.guidance_scale
    model_dir = Path(pipe.sources["model_dir"])
    vae = dict(pipe.vae_options)
    used = getattr(pipe, "last_decode_options", None)
    if used is not None and used != pipe.vae_options:  # the decode ran out of memory and retried with a smaller plan
        vae["retried_with"] = used
    return {
        **settings.to_file(),  # under the file names (cfg_scale, num_steps ...), like sweep files
        "seed": seed,
        "sigmas": sigmas,
        "cfg_schedule": list(scale) if isinstance(scale, Sequence) else [scale] * (len(sigmas) - 1),
        "fps": options.fps,
        "dtype": str(pipe.dit.dtype).removeprefix("torch."),
        "t5_dtype": _dtype_name(pipe.text_encoder.dtype),
        "vae_dtype": _dtype_name(next(pipe.decoder.parameters()).dtype),
        "model_dir": str(model_dir),
        "text_encoder": pipe.sources.get("text_encoder"),
        "model_files": describe_files(model_dir),
        "mochi_preview": __version__,
        "torch": torch.__version__,
        "device": str(pipe.device),
        "noise_device": noise_device,
        "memory": pipe.memory_record(),  # the memory mode (asked, chosen) and the bytes each stage moved
        "batch_cfg": pipe.last_batch_cfg,  # whether the CFG branches ran in one batch (None: no CFG)
        "loras": pipe.lora_record(),  # each LoRA's file name, size, sha256 and strength
        "attention": pipe.dit.attention_backend_in_use,  # the kernel the DiT ran ("sdpa", "flash", "sage")
        "processes": pipe.cp.world_size if pipe.cp is not None else 1,
        "vae": vae,
        "seconds": {},
        "peak_memory_bytes": {},
        "created": None,
        "frames_digest": None,  # sha256 of the uint8 frames (video.frames_digest)
        "stream_digest": None,  # sha256 of the encoded stream (video.stream_digest; in the sidecar, not the MP4)
    }


def latents_metadata(pipe: MochiPipeline, settings: Settings, options: RunOptions) -> dict:
    """What a latents file of this run records (see latents_file): enough to decode it into this run's video."""
    from .vae import LATENTS_MEAN, LATENTS_STD

    mean, std = pipe.latent_stats or (LATENTS_MEAN, LATENTS_STD)
    decoder_dtype = next(pipe.decoder.parameters()).dtype
    return {
        "settings": settings.to_file(),
        "model_dir": pipe.sources["model_dir"],
        "latent_stats": {"mean": list(mean), "std": list(std)},
        "decode": {"dtype": str(decoder_dtype).removeprefix("torch."), "vae": pipe.vae_options, "fps": options.fps},
        "record": run_record(pipe, settings, options, settings.seed),  # generate draws a seed before sampling
    }


def decode_latents_file(args: argparse.Namespace) -> Path:
    """--decode_latents: only the VAE decoder (from --model_dir, else the folder the file names) decodes a latents
    file into the MP4 and sidecar its run would have written (the sidecar adds "decoded_from")."""
    from .pipeline import _peak_rss
    from .vae import load_vae_decoder

    source = args.decode_latents
    latents, meta = load_latents(source)
    model_dir = find_model_dir(args.model_dir if args.model_dir is not None else meta["model_dir"])
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else getattr(torch, meta["decode"]["dtype"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    claim = outputs.claim(args.output) if args.output is not None else outputs.claim_for(new_output_path(args.out_dir))
    vae = {"auto": {"mode": "auto"}, "on": {"mode": "tiled"}, "off": {"mode": "full"}}[args.vae_tiling]
    try:
        decoder = load_vae_decoder(model_dir, dtype=dtype).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.inference_mode():
            frames, used = decode_frames(decoder, latents.to(device), latent_stats_of(meta), vae)
    except DecodeMemoryError as e:
        claim.release()
        kept = f"{source} (try --vae_tiling on, or --device cpu)"
        raise DecodeMemoryError(e.reason, e.latents, e.attempts, kept=kept) from None
    except BaseException:
        claim.release()
        raise
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()
    record = dict(meta["record"])
    fps = meta["decode"].get("fps", record.get("fps", 30))
    record.update(
        vae={**vae, "retried_with": used} if used != vae else vae,
        seconds={**record.get("seconds", {}), "vae": seconds},
        peak_memory_bytes={**record.get("peak_memory_bytes", {}), "vae": peak},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        decoded_from=str(source),
        decode_device=str(device),
    )
    frames = frames[0].cpu().numpy()
    record.update(frames_digest=frames_digest(frames))
    video = claim.publish(
        lambda tmp: encode_video(frames, tmp, fps, metadata={"mochi": json.dumps(record)}),
        lambda tmp: {**record, "stream_digest": stream_digest(tmp)},
    )
    print(f"wrote {video} (decoded {source}: {seconds:.1f} s / {peak / 2**30:.2f} GiB)", file=sys.stderr)
    return video


def _unused(path: Path) -> Path:
    """`path`, or the first of path-1, path-2 ... that does not exist (a latents file is never overwritten)."""
    stem, n = path.name.removesuffix(".latents.safetensors"), 1
    while path.exists():
        path, n = path.with_name(f"{stem}-{n}.latents.safetensors"), n + 1
    return path


def _dtype_name(dtype: torch.dtype) -> str:
    """The --dtype / --t5_dtype name of a dtype (bf16, fp32), or torch's name for others."""
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code = 128 + signum


@dataclass
class Progress:
    """Where the CLI is, for the one line an interrupt prints; the pipeline's step callback."""

    steps: int = 0
    done: int = 0
    sampling: bool = False
    line: str = ""  # " of line 3" in a sweep
    path: Path | None = None  # the video being made

    def __call__(self, pipe, i, sigma, state):
        self.done = i + 1

    def start(self, settings: Settings, path: Path | None, line: str = "") -> Progress:
        self.steps, self.done, self.sampling, self.line, self.path = settings.num_inference_steps, 0, True, line, path
        return self

    def stopped(self, how: str, written: list[Path]) -> str:
        """The line for a run stopped by a signal; `written`: the videos this run published."""
        if written and written[-1] == self.path:  # the signal came during the last rename: it was held till then
            return f"{how} after writing {self.path}"
        if not self.sampling:
            where = "before sampling"
        elif self.done < self.steps:
            where = f"at step {self.done}/{self.steps}"
        else:
            where = f"after the last step ({self.done}/{self.steps}), decoding or writing"
        kept = f" ({len(written)} earlier video(s) kept, the last {written[-1]})" if written else ""
        return f"{how} {where}{self.line}; nothing written{' for it' if kept else ''}{kept}"


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP raise `Stopped` (SIGINT raises KeyboardInterrupt), so every exit path cleans up."""

    def stop(signum, frame):
        raise Stopped(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def one_line_warnings():
    """Warnings as `warning: message` lines (not Python's file:line and source line)."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before


def quiet_libraries() -> None:
    """--quiet: no progress bars or notes from transformers and huggingface_hub either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def check_request(args: argparse.Namespace, runs: list[Settings]) -> None:
    """Everything about the request but its settings, before any weights load: the flags that go together, the
    output names, the device, --gpus, the output folder's writability and free space. Creates nothing."""
    if args.output is not None and args.sweep_file is not None:
        raise ValueError("--output names one file; with --sweep-file use --out_dir")
    if args.save_latents is not None and (args.sweep_file is not None or args.decode_latents is not None):
        raise ValueError("--save_latents names one file for one generation; not with --sweep-file or --decode_latents")
    if args.decode_latents is not None and args.sweep_file is not None:
        raise ValueError("--decode_latents decodes one file; not with --sweep-file")
    for flag, path in (("--output", args.output), ("--save_latents", args.save_latents)):
        if path is not None and path.exists():
            raise ValueError(f"{flag} {path} exists; not overwriting it (choose another {flag})")
    if args.output is not None and outputs.sidecar_of(args.output).exists():
        raise ValueError(f"--output {args.output}: its sidecar {outputs.sidecar_of(args.output)} exists")
    check_preview(args, runs)
    check_device(args.device)
    lora_arguments(args)
    launch.processes(args.gpus, args.device)
    folder, flag = (args.output.parent, "--output") if args.output is not None else (args.out_dir, "--out_dir")
    outputs.check_writable(folder, flag)
    if runs:
        outputs.check_space(folder, max(estimated_bytes(s.num_frames, s.height, s.width) for s in runs), flag)


def check_preview(args: argparse.Namespace, runs: list[Settings]) -> None:
    """--preview / --preview_every (ValueError naming the flag): a .png path (so never the video, sidecar or latents
    this run writes) in a writable folder, not an input image of the run, and a step count of at least 1. Creates
    nothing."""
    if args.preview_every < 1:
        raise ValueError(f"--preview_every must be a whole number of steps >= 1; got {args.preview_every}")
    path = args.preview
    if path is None:
        return
    if args.decode_latents is not None:
        raise ValueError("--preview shows sampling; --decode_latents only decodes (leave --preview out)")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--preview {path}: must end in .png (it is a PNG image)")
    if path.is_dir():
        raise ValueError(f"--preview {path} is a folder; give a .png file path")
    if any(s.image is not None and path.resolve() == Path(s.image).resolve() for s in runs):
        raise ValueError(f"--preview {path} is the input --image: it would be overwritten; choose another name")
    outputs.check_writable(path.parent, "--preview")


def check_latent_stats(model_dir: Path) -> None:
    """A model folder's latent_stats.json, read before the weights: a malformed one names the file and the key."""
    from .vae.latents import load_latent_stats

    load_latent_stats(model_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: exit 0 when the video(s) were written, 2 for a bad request (a message, no traceback, nothing
    written), 1 when another process of a torchrun job failed, 130 on Ctrl-C, 128 + N on signal N."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser(help_defaults(argv)).parse_args(argv)
    if args.quiet:
        quiet_libraries()
    progress = Progress()
    before = len(outputs.published)
    with one_line_warnings(), stop_on_signals():
        try:
            return _run(args, argv, progress)
        except KeyboardInterrupt:
            print(progress.stopped("interrupted", outputs.published[before:]), file=sys.stderr)
            return 130
        except Stopped as e:
            print(progress.stopped(f"stopped by {e}", outputs.published[before:]), file=sys.stderr)
            return e.code
        except RankFailedError as e:  # another process of the torchrun job failed first: name it, no trace
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (ValueError, OSError, NonFiniteLatentsError, DeviceMemoryError, torch.OutOfMemoryError) as e:
            print(f"error: {_message(e)}", file=sys.stderr)
            return 2


def _run(args: argparse.Namespace, argv: list[str], progress: Progress) -> int:
    options = RunOptions.from_args(args)
    if args.decode_latents is not None:
        check_request(args, [])
        decode_latents_file(args)
        return 0
    # Everything the user asked for is checked before any weights load: find the folder and its defaults
    # (cheap), apply the flags, check; only then load (slow).
    model_dir = find_model_dir(args.model_dir)
    base = table.from_arguments(args, cli_defaults(model_dir, args.preset))
    runs = read_sweep(args.sweep_file, base) if args.sweep_file is not None else [base.check("cli")]
    runs = fit_to_inputs(args, runs, model_dir)
    check_request(args, runs)
    check_latent_stats(model_dir)
    processes = launch.processes(args.gpus, args.device)
    if processes > 1:
        return launch.launch(processes, argv)  # each process runs this command again (and warns, on rank 0)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if is_demo(model_dir) and main_process:
        from .demo.vocabulary import prompt_warning

        for problem in {prompt_warning(p) for s in runs for p in _prompts(s)} - {None}:
            print(f"warning: {problem}", file=sys.stderr)
    if args.sweep_file is None:
        path = outputs.claim_for(args.output or new_output_path(args.out_dir)).path if main_process else None
        try:
            pipe, model_dir = load_pipeline(args, model_dir)
        except BaseException:
            if path is not None:
                outputs.release(path)
            raise
        with guarded(pipe):
            generate(pipe, runs[0], path, options, callback=progress.start(runs[0], path))
        return 0
    pipe, model_dir = load_pipeline(args, model_dir)
    for i, s in enumerate(runs):
        # The name holds the line's settings digest: a finished line is skipped on the next run (resume),
        # and an edited line is generated again under a new name.
        path = (args.out_dir / f"{args.sweep_file.stem}_{i:04d}_{s.digest()}.mp4").absolute()
        skip = _sweep_claim(path, i) if pipe.is_main_process else None
        if pipe.cp is not None:
            skip = pipe.cp.broadcast_object(skip)  # rank 0 decides
        if skip:
            continue
        path = path if pipe.is_main_process else None
        with guarded(pipe):
            generate(pipe, s, path, options, progress.start(s, path, f" of line {i}"))
    return 0


def _sweep_claim(path: Path, line: int) -> bool:
    """Claim a sweep line's video name; True (with a note) when the line is done or another run is on it."""
    try:
        outputs.claim(path)
        return False
    except FileExistsError:
        pass
    video, sidecar = path.exists(), outputs.sidecar_of(path).exists()
    if video and sidecar:
        print(f"skip {line}: {path} exists", file=sys.stderr)
    elif video or sidecar:
        there, missing = (path, "sidecar") if video else (outputs.sidecar_of(path), "video")
        print(f"warning: skip {line}: {there} has no {missing} (from an older version?); move it away to generate "
              "this line again", file=sys.stderr)  # fmt: skip
    else:
        print(f"skip {line}: another run is writing {path}", file=sys.stderr)
    return True


def _message(e: BaseException) -> str:
    """An error's message; an OSError of ours without "[Errno N]" (the system's own keep it, with the file name)."""
    return e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else str(e)


def _prompts(s: Settings) -> list[str]:
    return [s.prompt] if isinstance(s.prompt, str) else list(s.prompt)


def guarded(pipe: MochiPipeline):
    """Under torchrun, a failure here (e.g. rank 0 writing the video) stops the other ranks, naming this one."""
    return pipe.cp.guard() if pipe.cp is not None else nullcontext()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
