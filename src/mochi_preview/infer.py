"""Command line: `python -m mochi_preview.infer --prompt ... [--model_dir DIR]` (also installed as `mochi`).

Writes `<out_dir>/output_<timestamp>.mp4` (H.264, yuv420p) and a JSON sidecar with every setting, so any video can be
regenerated; files appear complete or not at all, and existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from . import settings as table
from .distributed import RankFailedError, launched_world_size
from .pipeline import DeviceMemoryError, MochiPipeline, NonFiniteLatentsError, resolve_model_dir
from .settings import Settings, model_defaults
from .video import export_to_video, new_output_path, write_json_atomic

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class RunOptions:
    """How a video is made and written, apart from its settings (so not part of a sweep line's digest)."""

    fps: float = 30  # frame rate of the MP4
    batch_cfg: bool = False  # both CFG branches in one batch (more memory)
    progress: bool = True  # a progress bar on stderr

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(fps=args.fps, batch_cfg=args.batch_cfg, progress=not args.quiet)


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
    p.add_argument("--cpu_offload", action="store_true", help="keep models on the CPU, one on the device at a time")
    p.add_argument("--sequential_offload", action="store_true", help="also stream DiT blocks one by one (least memory)")
    p.add_argument("--vae_tiling", choices=["auto", "on", "off"], default="auto", help="tiled VAE decoding")
    p.add_argument(
        "--attention",
        choices=["auto", "sdpa", "flash", "sage"],
        default="auto",
        help="attention kernel (auto: flash-attn on a GPU that has it, else PyTorch SDPA)",
    )
    p.add_argument("--attention_chunk", type=int, help="SDPA query rows per call (default: 4096 on CPU, all on GPU)")
    p.add_argument(
        "--fp8",
        choices=["tensor", "channel", "checkpoint"],
        help="DiT block weights in float8 (half of bf16): quantize per tensor / per channel, or keep a fp8 file's",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT and VAE blocks (slow first run)")
    p.add_argument("--batch_cfg", action="store_true", help="run both CFG branches in one batch (more memory)")
    p.add_argument(
        "--cfg_parallel", choices=["auto", "on", "off"], default="auto", help="torchrun: CFG branches on rank halves"
    )
    p.add_argument("--shard_dit", action="store_true", help="torchrun: each rank keeps only its share of DiT blocks")
    p.add_argument("--out_dir", type=Path, default=Path("outputs"), help="where videos go (default outputs/)")
    p.add_argument("--output", type=Path, help="exact output path (.mp4); refused if it exists")
    p.add_argument("--fps", type=int, default=30, help="frame rate of the MP4 (default 30)")
    p.add_argument("--sweep-file", dest="sweep_file", type=Path, help="JSONL: one generation per line, resumable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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


def load_pipeline(args: argparse.Namespace, model_dir: Path | None = None) -> tuple[MochiPipeline, Path]:
    """The pipeline the flags ask for, from `model_dir` (default: found from --model_dir); the slow part."""
    model_dir = model_dir if model_dir is not None else find_model_dir(args.model_dir)
    parallel = launched_world_size() > 1  # started by torchrun with several processes: all work on each video
    if args.shard_dit and not parallel:
        raise ValueError("--shard_dit shares the DiT between processes: run under torchrun --nproc_per_node=N")
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
    )
    if args.sequential_offload:
        pipe.enable_sequential_cpu_offload()
    elif args.cpu_offload:
        pipe.enable_model_cpu_offload()
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
    """
    out = pipe(
        **settings.pipeline_kwargs(),
        batch_cfg=options.batch_cfg,
        progress=options.progress,
        callback_on_step_end=callback,
    )
    if not pipe.is_main_process:
        return None
    seed = getattr(out, "seed", None)  # the seed the pipeline used (drawn when settings.seed is None)
    if seed is None:
        seed = settings.seed
    if seed is None:
        raise RuntimeError("the pipeline drew a random seed but did not report it (MochiOutput.seed)")
    sigmas = settings.sigmas
    scale = settings.guidance_scale
    model_dir = Path(pipe.sources["model_dir"])
    record = {
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
        "offload": pipe.offload,
        "processes": pipe.cp.world_size if pipe.cp is not None else 1,
        "vae": pipe.vae_options,
        "seconds": out.timings,
        "peak_memory_bytes": out.peak_memory,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    video = export_to_video(out.frames[0], output, fps=options.fps, metadata={"mochi": json.dumps(record)})
    write_json_atomic(output.with_suffix(".json"), record)
    summary = ", ".join(f"{k} {v:.1f} s / {out.peak_memory.get(k, 0) / 2**30:.2f} GiB" for k, v in out.timings.items())
    print(f"wrote {video} ({summary})", file=sys.stderr)
    return video


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
    options = RunOptions.from_args(args)
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
