"""Command line: `python -m mochi_preview.infer --prompt ... [--model_dir DIR]` (also installed as `mochi`).

Writes `<out_dir>/output_<timestamp>.mp4` (H.264, yuv420p) and a JSON sidecar with every setting, so any video can be
regenerated; files appear complete or not at all, and existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__
from . import settings as table
from .distributed import RankFailedError, check_compatible, launched_world_size
from .latents_file import decode_command, latent_stats_of, latents_path_for, load_latents, save_latents
from .pipeline import (
    SEED_BITS,
    DecodeMemoryError,
    DeviceMemoryError,
    MochiPipeline,
    NonFiniteLatentsError,
    decode_frames,
    resolve_model_dir,
)
from .settings import Settings, model_defaults
from .video import export_to_video, new_output_path, write_json_atomic

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class RunOptions:
    """How a video is made and written, apart from its settings (so not part of a sweep line's digest)."""

    fps: float = 30  # frame rate of the MP4
    batch_cfg: bool | str = "auto"  # both CFG branches in one batch: True, False, "auto" (when memory allows)
    progress: bool = True  # a progress bar on stderr
    save_latents: Path | None = None  # also write the finished latents there, before the decode (a latents file)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(
            fps=args.fps,
            batch_cfg={"auto": "auto", "on": True, "off": False}[args.batch_cfg],
            progress=not args.quiet,
            save_latents=getattr(args, "save_latents", None),
        )


def describe_files(folder: Path) -> dict:
    """Model files with their sizes (and mtimes): enough to tell which weights made a video without hashing GBs."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".model"):
            stat = p.stat()
            out[str(p.relative_to(folder))] = {"bytes": stat.st_size, "mtime": int(stat.st_mtime)}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mochi", description="Generate a video with Mochi 1 preview.")
    table.add_arguments(p)  # --prompt, --width, --cfg_scale, --num_steps ...: from the settings table
    p.add_argument("--model_dir", type=Path, help="weights folder (native or diffusers layout) or a cached Hub id")
    p.add_argument("--t5_dir", type=Path, help="T5 folder, if not inside --model_dir (a google/t5-v1_1-xxl download)")
    p.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="DiT/VAE (auto: bf16 GPU, fp32 CPU)"
    )
    p.add_argument("--t5_dtype", choices=sorted(DTYPES), default="fp32", help="T5 weights (default fp32)")
    p.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")
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
    p.add_argument("--fps", type=int, default=30, help="frame rate of the MP4 (default 30)")
    p.add_argument("--sweep-file", dest="sweep_file", type=Path, help="JSONL: one generation per line, resumable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--save_latents",
        type=Path,
        metavar="PATH",
        help="also write the finished latents to PATH (.safetensors, with what decoding them needs) before decoding",
    )
    p.add_argument(
        "--decode_latents",
        type=Path,
        metavar="PATH",
        help="decode a latents file (from --save_latents, or left by a decode that ran out of memory) into its MP4 "
        "and sidecar; loads only the VAE decoder",
    )
    return p


def read_sweep(path: Path, base: Settings) -> list[Settings]:
    """One checked Settings per non-empty JSONL line (file names: cfg_scale, num_steps ...); an unknown key or a bad
    value stops everything, naming the line: a sweep is checked whole before any weights load."""
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not valid JSON ({e.msg})") from e
        try:
            runs.append(base.updated(entry, "file").check("file"))
        except ValueError as e:
            raise SystemExit(f"{path}:{number}: {e}") from e
    return runs


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
        text_encoder_dtype=DTYPES[args.t5_dtype],
        attention_backend=args.attention,
        attention_chunk=args.attention_chunk,
        fp8=args.fp8,
        context_parallel=parallel,
        cfg_parallel={"auto": None, "on": True, "off": False}[args.cfg_parallel],
        shard_dit=args.shard_dit,
        memory=memory,
    )
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
) -> Path | None:
    """Generate one video to `output` (an .mp4 path, + a `.json` sidecar), both written atomically.

    `settings` are checked by the pipeline (callers that can, check them earlier, before loading weights);
    `seed=None` draws a random seed, which the sidecar records. `callback`: the pipeline's callback_on_step_end.
    Under torchrun every rank generates and only rank 0 writes (the others pass and get None).

    `options.save_latents`: the finished latents are also written there (a latents file) before the decode. When the
    decode runs out of memory, also with a smaller plan, the latents are written (there, or beside `output`) and the
    `DecodeMemoryError` names the file and the command that decodes it: nothing is lost.
    """
    if settings.seed is None:  # drawn here, so that a latents file written before the decode records it
        settings = replace(settings, seed=secrets.randbits(SEED_BITS))
    saved: list[Path] = []
    on_step = callback
    if options.save_latents is not None and pipe.is_main_process:
        last_step = len(settings.sigmas) - 2

        def on_step(p, i, sigma, state):
            out = callback(p, i, sigma, state) if callback is not None else None
            if i == last_step:  # the latents the decoder gets: these, or what the callback replaced them with
                replaced = out.get("latents") if isinstance(out, dict) else None
                z = state["latents"] if replaced is None else replaced
                saved.append(save_latents(options.save_latents, z, latents_metadata(pipe, settings, options)))
                print(f"wrote {saved[-1]} (the latents)", file=sys.stderr)
            return out

    try:
        out = pipe(
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
    if not pipe.is_main_process:
        return None
    seed = getattr(out, "seed", None)  # the seed the pipeline used (drawn when settings.seed is None)
    if seed is None:
        seed = settings.seed
    if seed is None:
        raise RuntimeError("the pipeline drew a random seed but did not report it (MochiOutput.seed)")
    record = run_record(pipe, settings, options, seed, getattr(out, "noise_device", "cpu"))
    record.update(seconds=out.timings, peak_memory_bytes=out.peak_memory, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    video = export_to_video(out.frames[0], output, fps=options.fps, metadata={"mochi": json.dumps(record)})
    write_json_atomic(output.with_suffix(".json"), record)
    summary = ", ".join(f"{k} {v:.1f} s / {out.peak_memory.get(k, 0) / 2**30:.2f} GiB" for k, v in out.timings.items())
    print(f"wrote {video} ({summary})", file=sys.stderr)
    return video


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
        "model_dir": str(model_dir),
        "text_encoder": pipe.sources.get("text_encoder"),
        "model_files": describe_files(model_dir),
        "mochi_preview": __version__,
        "torch": torch.__version__,
        "device": str(pipe.device),
        "noise_device": noise_device,
        "memory": pipe.memory_record(),  # the memory mode (asked, chosen) and the bytes each stage moved
        "batch_cfg": pipe.last_batch_cfg,  # whether the CFG branches ran in one batch (None: no CFG)
        "attention": pipe.dit.attention_backend_in_use,  # the kernel the DiT ran ("sdpa", "flash", "sage")
        "processes": pipe.cp.world_size if pipe.cp is not None else 1,
        "vae": vae,
        "seconds": {},
        "peak_memory_bytes": {},
        "created": None,
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
    output = args.output or new_output_path(args.out_dir)
    vae = {"auto": {"mode": "auto"}, "on": {"mode": "tiled"}, "off": {"mode": "full"}}[args.vae_tiling]
    decoder = load_vae_decoder(model_dir, dtype=dtype).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            frames, used = decode_frames(decoder, latents.to(device), latent_stats_of(meta), vae)
    except DecodeMemoryError as e:
        kept = f"{source} (try --vae_tiling on, or --device cpu)"
        raise DecodeMemoryError(e.reason, e.latents, e.attempts, kept=kept) from None
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
    video = export_to_video(frames[0].cpu().numpy(), output, fps=fps, metadata={"mochi": json.dumps(record)})
    write_json_atomic(output.with_suffix(".json"), record)
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


def guarded(pipe: MochiPipeline):
    """Under torchrun, a failure here (e.g. rank 0 writing the video) stops the other ranks, naming this one."""
    return pipe.cp.guard() if pipe.cp is not None else nullcontext()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is not None and args.output.exists():
        raise SystemExit(f"{args.output} exists; not overwriting it (choose another --output)")
    if args.output is not None and args.sweep_file is not None:
        raise SystemExit("--output names one file; with --sweep-file use --out_dir")
    if args.fps <= 0:
        parser.error(f"--fps must be a positive number; got {args.fps}")
    if args.save_latents is not None and args.save_latents.exists():
        raise SystemExit(f"{args.save_latents} exists; not overwriting it (choose another --save_latents)")
    if args.save_latents is not None and (args.sweep_file is not None or args.decode_latents is not None):
        raise SystemExit("--save_latents names one file for one generation; not with --sweep-file or --decode_latents")
    if args.decode_latents is not None and args.sweep_file is not None:
        raise SystemExit("--decode_latents decodes one file; not with --sweep-file")
    options = RunOptions.from_args(args)
    if args.decode_latents is not None:
        try:
            decode_latents_file(args)
            return 0
        except (ValueError, OSError, DeviceMemoryError, torch.OutOfMemoryError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        # Everything the user asked for is checked before any weights load: find the folder and its defaults
        # (cheap), apply the flags, check; only then load (slow).
        model_dir = find_model_dir(args.model_dir)
        base = table.from_arguments(args, model_defaults(model_dir))
        runs = read_sweep(args.sweep_file, base) if args.sweep_file is not None else [base.check("cli")]
        pipe, model_dir = load_pipeline(args, model_dir)
        if args.sweep_file is None:
            path = (args.output or new_output_path(args.out_dir)) if pipe.is_main_process else None
            with guarded(pipe):
                generate(pipe, runs[0], path, options)
            return 0
        if pipe.is_main_process:
            args.out_dir.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(runs):
            # The name holds the line's settings digest: a finished line is skipped on the next run (resume),
            # and an edited line is generated again under a new name.
            path = args.out_dir / f"{args.sweep_file.stem}_{i:04d}_{s.digest()}.mp4"
            done = pipe.cp.broadcast_object(path.exists()) if pipe.cp is not None else path.exists()  # rank 0 decides
            if done:
                if pipe.is_main_process:
                    print(f"skip {i}: {path} exists", file=sys.stderr)
                continue
            with guarded(pipe):
                generate(pipe, s, path if pipe.is_main_process else None, options)
        return 0
    except RankFailedError as e:  # another process of the torchrun job failed first: name it, no trace
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, NonFiniteLatentsError, DeviceMemoryError) as e:  # bad input: a message, no trace
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
