"""Command line: `python -m mochi_preview.infer --prompt ... [--model_dir DIR]` (also installed as `mochi`).

Writes `<out_dir>/output_<timestamp>.mp4` (H.264, yuv420p) and a JSON sidecar with every setting, so any video can be
regenerated; files appear complete or not at all, and existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from . import __version__
from .distributed import RankFailedError, launched_world_size
from .pipeline import DeviceMemoryError, MochiPipeline, NonFiniteLatentsError, check_sampling, check_video_size
from .sampling import linear_quadratic_schedule
from .video import export_to_video, new_output_path, write_json_atomic

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_PROMPT = (
    "A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl filled with lemons and sprigs of "
    "mint against a peach-colored background. The hand gently tosses the lemon up and catches it, showcasing its "
    "smooth texture. A beige string bag sits beside the bowl, adding a rustic touch to the scene. Additional lemons, "
    "one halved, are scattered around the base of the bowl. The even lighting enhances the vibrant colors and "
    "creates a fresh, inviting atmosphere."
)


@dataclass(frozen=True)
class Settings:
    """One generation's settings: what the sidecar records and a sweep line may override."""

    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    width: int = 848
    height: int = 480
    num_frames: int = 163
    seed: int = 1710977262
    cfg_scale: float = 6.0
    num_steps: int = 64
    threshold_noise: float = 0.025
    linear_steps: int | None = None

    def check(self) -> Settings:
        check_video_size(self.num_frames, self.height, self.width)
        check_sampling(self.num_steps, self.cfg_scale)
        linear_quadratic_schedule(self.num_steps, self.threshold_noise, self.linear_steps)  # validates them
        return self

    @property
    def sigmas(self) -> list[float]:
        return linear_quadratic_schedule(self.num_steps, self.threshold_noise, self.linear_steps)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SWEEP_KEYS = {f.name for f in fields(Settings)}


def model_defaults(model_dir: Path | None) -> dict:
    """Defaults a model folder recommends (`mochi_defaults.json`, e.g. the small demo model's 64x64 clips)."""
    if model_dir is None or not (model_dir / "mochi_defaults.json").is_file():
        return {}
    values = json.loads((model_dir / "mochi_defaults.json").read_text())
    return {k: v for k, v in values.items() if k in SWEEP_KEYS}


def describe_files(folder: Path) -> dict:
    """Model files with their sizes (and mtimes): enough to tell which weights made a video without hashing GBs."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".model"):
            stat = p.stat()
            out[str(p.relative_to(folder))] = {"bytes": stat.st_size, "mtime": int(stat.st_mtime)}
    return out


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="mochi", description="Generate a video with Mochi 1 preview.")
    p.add_argument("--prompt", help="what the video shows (default: the model card's lemon prompt)")
    p.add_argument("--negative_prompt", help='what to steer away from; "" (default) means "no text"')
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default {d.width})")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 16 (default {d.height})")
    p.add_argument("--num_frames", type=int, help=f"6k+1 frames, e.g. 31, 85, 163 (default {d.num_frames})")
    p.add_argument("--seed", type=int, help=f"noise seed; the same seed gives the same video (default {d.seed})")
    p.add_argument("--cfg_scale", type=float, help=f"classifier-free guidance scale (default {d.cfg_scale})")
    p.add_argument("--num_steps", type=int, help=f"sampling steps (default {d.num_steps})")
    p.add_argument("--threshold-noise", dest="threshold_noise", type=float, help="schedule threshold (0.025)")
    p.add_argument("--linear-steps", dest="linear_steps", type=int, help="linear part of the schedule (steps/2)")
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


def settings_from_args(args: argparse.Namespace, defaults: dict) -> Settings:
    base = replace(Settings(), **defaults)
    given = {k: getattr(args, k) for k in SWEEP_KEYS if getattr(args, k, None) is not None}
    return replace(base, **given)


def read_sweep(path: Path, base: Settings) -> list[Settings]:
    """One Settings per non-empty JSONL line; unknown keys and bad values are reported with their line number."""
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(entry, dict) or (unknown := set(entry) - SWEEP_KEYS):
            raise SystemExit(f"{path}:{number}: unknown keys {sorted(unknown)}; valid: {sorted(SWEEP_KEYS)}")
        try:
            runs.append(replace(base, **entry).check())
        except ValueError as e:
            raise SystemExit(f"{path}:{number}: {e}") from e
    return runs


def resolve_dtype(name: str, device: str | None) -> torch.dtype:
    """bf16 where it is fast (GPUs), fp32 on CPUs, where bf16 convolutions are slow; or what was asked."""
    if name != "auto":
        return DTYPES[name]
    on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return torch.bfloat16 if on_gpu else torch.float32


def load_pipeline(args: argparse.Namespace) -> tuple[MochiPipeline, Path]:
    model_dir = args.model_dir
    if model_dir is None:
        from .tiny import default_model_dir

        model_dir = default_model_dir()
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
    pipe: MochiPipeline, s: Settings, args: argparse.Namespace, path: Path | None, model_dir: Path, callback=None
) -> Path | None:
    """Generate one video to `path` (+ `.json` sidecar), both written atomically; `callback` as the pipeline's.

    Under torchrun every rank generates and only rank 0 writes (the others get path None).
    """
    sigmas = s.sigmas
    out = pipe(
        s.prompt,
        negative_prompt=s.negative_prompt,
        height=s.height,
        width=s.width,
        num_frames=s.num_frames,
        sigmas=sigmas,
        guidance_scale=s.cfg_scale,
        seed=s.seed,
        batch_cfg=args.batch_cfg,
        progress=not args.quiet,
        callback_on_step_end=callback,
    )
    if not pipe.is_main_process:
        return None
    record = {
        **asdict(s),
        "sigmas": sigmas,
        "cfg_schedule": [s.cfg_scale] * (len(sigmas) - 1),
        "fps": args.fps,
        "dtype": str(pipe.dit.dtype).removeprefix("torch."),
        "t5_dtype": args.t5_dtype,
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
    video = export_to_video(out.frames[0], path, fps=args.fps, metadata={"mochi": json.dumps(record)})
    write_json_atomic(path.with_suffix(".json"), record)
    summary = ", ".join(f"{k} {v:.1f} s / {out.peak_memory.get(k, 0) / 2**30:.2f} GiB" for k, v in out.timings.items())
    print(f"wrote {video} ({summary})", file=sys.stderr)
    return video


def guarded(pipe: MochiPipeline):
    """Under torchrun, a failure here (e.g. rank 0 writing the video) stops the other ranks, naming this one."""
    return pipe.cp.guard() if pipe.cp is not None else nullcontext()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output is not None and args.output.exists():
        raise SystemExit(f"{args.output} exists; not overwriting it (choose another --output)")
    if args.output is not None and args.sweep_file is not None:
        raise SystemExit("--output names one file; with --sweep-file use --out_dir")
    try:
        pipe, model_dir = load_pipeline(args)
        base = settings_from_args(args, model_defaults(model_dir))
        if args.sweep_file is None:
            path = (args.output or new_output_path(args.out_dir)) if pipe.is_main_process else None
            with guarded(pipe):
                generate(pipe, base.check(), args, path, model_dir)
            return 0
        runs = read_sweep(args.sweep_file, base)
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
                generate(pipe, s, args, path if pipe.is_main_process else None, model_dir)
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
