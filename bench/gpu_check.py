"""The stages of `bench/gpu_check.sh`: the issue-22 points a lent GPU can show, one stage per process.

    python bench/gpu_check.py STAGE --work DIR [--cpu]        STAGE: env, models, mode, noise, oom, compile, report

Each stage appends one JSON object to DIR/results.jsonl ({"stage": ..., "ok": bool, ...}); `report` turns them into
the markdown table gpu_check.sh prints. No real weights are needed: `models` writes random models in the real
layouts (native dit/decoder.safetensors and a t5/ folder): "tiny" (the test size) and "wide" (the published widths:
a 3072-wide DiT with a few blocks, the published VAE decoder, a one-layer 4096-wide T5).

`--cpu` (the dry run): the same code on the CPU at toy sizes, "wide" being the tiny model; what only a GPU can show
(CUDA generators, the memory-fraction cap, inductor) is replaced by its CPU stand-in and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GIB = 2**30
PROMPT = "a red ball bouncing on a wooden floor"
WIDE_DIT_DEPTH = 4  # blocks of the published-width DiT (48 in the published model)


def sizes(cpu: bool) -> dict:
    """The generation size: 848x480, 31 frames on a GPU; the test size on the CPU."""
    if cpu:
        return dict(height=32, width=48, num_frames=13, num_inference_steps=2)
    return dict(height=480, width=848, num_frames=31, num_inference_steps=3)


def device_of(cpu: bool) -> torch.device:
    return torch.device("cpu" if cpu else "cuda")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    """Peak device bytes since `reset_peak` (None on the CPU: no device memory to speak of)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


# ---- stages ------------------------------------------------------------------------------------------------------


def stage_env(args) -> dict:
    from mochi_preview.dit.attention import available_backends

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "attention": available_backends()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / GIB, 1))
    elif not args.cpu:
        raise RuntimeError("no CUDA device: run with --cpu for the dry run")
    return info


def stage_models(args) -> dict:
    from mochi_preview.tiny import save_random_model

    work = Path(args.work)
    start = time.perf_counter()
    tiny = work / "tiny"
    if not (tiny / "dit.safetensors").is_file():
        save_random_model(tiny)
    out = {"tiny": str(tiny)}
    if not args.cpu:
        out["wide"] = str(save_wide_model(work / "wide"))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def save_wide_model(folder: Path) -> Path:
    """Random weights at the published widths in the native layout: a WIDE_DIT_DEPTH-block 3072-wide DiT (bf16),
    the published VAE decoder (bf16) and a one-layer T5 of the published width, text_dim 4096."""
    from safetensors.torch import save_file

    from mochi_preview.configs import CONFIGS
    from mochi_preview.dit import AsymmDiT, save_dit_native
    from mochi_preview.tiny import save_tiny_t5
    from mochi_preview.vae import Decoder

    if (folder / "dit.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    published = CONFIGS["mochi-1-preview"]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        dit = randomize(AsymmDiT(replace(published.dit, depth=WIDE_DIT_DEPTH)))
        save_dit_native(folder / "dit.safetensors", dit, dtype=torch.bfloat16)
        del dit
        decoder = randomize(Decoder(published.decoder)).to(torch.bfloat16)
        save_file(
            {k: v.cpu().contiguous() for k, v in decoder.state_dict().items()}, str(folder / "decoder.safetensors")
        )
        del decoder
    t5 = published.t5
    save_tiny_t5(folder / "t5", d_model=t5.d_model, num_layers=1, num_heads=t5.num_heads, d_ff=t5.d_ff)
    return folder


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Small random weights, norm weights near 1 (activations stay in range), drawn where the module lives."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("weight") and ("norm" in name or ".stack.0." in name or ".stack.3." in name):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=p.device))
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, device=p.device) / max(fan_in, 1) ** 0.5)
    return module


def model_dir(args, which: str) -> Path:
    path = Path(args.work) / which
    return path if (path / "dit.safetensors").is_file() else Path(args.work) / "tiny"


def load(args, which: str, mode: str = "resident"):
    """A pipeline of the `which` model in memory `mode` through the public API: loading leaves the weights on the
    CPU, then enable_model_cpu_offload() / enable_sequential_cpu_offload() / disable_cpu_offload()."""
    from mochi_preview import MochiPipeline

    dtype = torch.float32 if args.cpu else torch.bfloat16
    pipe = MochiPipeline.from_pretrained(model_dir(args, which), torch_dtype=dtype, device=device_of(args.cpu))
    if mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.disable_cpu_offload()
    return pipe


def stage_mode(args) -> dict:
    """One memory mode: peak device memory while loading and while sampling, s/step, bytes moved, attention."""
    device = device_of(args.cpu)
    reset_peak(device)
    start = time.perf_counter()
    pipe = load(args, "wide", args.memory)
    load_peak, load_s = peak(device), time.perf_counter() - start
    size = sizes(args.cpu)
    out = pipe(PROMPT, seed=0, guidance_scale=4.5, output_type="latent", progress=False, **size)
    steps = size["num_inference_steps"]
    ledger = getattr(getattr(getattr(pipe, "memory", None), "mover", None), "ledger", None)
    moved = dict(getattr(ledger, "last_moved", {}) or {})
    return {
        "mode": args.memory,
        "memory_mode": getattr(pipe, "memory_mode", getattr(pipe, "offload", None)),
        "load_peak": load_peak,
        "load_s": round(load_s, 1),
        "text_peak": out.peak_memory.get("text"),
        "sampling_peak": out.peak_memory.get("dit"),
        "s_per_step": out.timings["dit"] / steps,
        "moved_dit": moved.get("dit"),
        "moved_text": moved.get("text"),
        "attention": getattr(pipe.dit, "attention_backend_in_use", "?"),
        "finite": bool(torch.isfinite(out.frames).all()),
    }


def stage_noise(args) -> dict:
    """Noise from a CUDA generator: drawn on the device, different from the CPU draw of the same seed, reported as
    such; a CUDA generator with a CPU pipeline refused before any work."""
    from mochi_preview.sampling import get_noise

    size = {k: v for k, v in sizes(args.cpu).items() if k != "num_inference_steps"}
    cpu_noise = get_noise(1, **size, seed=0)
    pipe = load(args, "tiny")
    if args.cpu:  # no CUDA: the CPU generator path, and the refusal with a stand-in CUDA generator
        g = torch.Generator("cpu").manual_seed(0)

        class StandIn:
            device = torch.device("cuda", 0)

        foreign = StandIn()
    else:
        g = torch.Generator("cuda").manual_seed(0)
        foreign = torch.Generator("cuda").manual_seed(0)
    out = pipe(PROMPT, generator=g, output_type="latent", num_inference_steps=2, progress=False, **size)
    drawn = get_noise(1, **size, generator=torch.Generator(g.device).manual_seed(0))
    cpu_pipe = load(args, "tiny") if args.cpu else None
    if cpu_pipe is None:
        from mochi_preview import MochiPipeline

        cpu_pipe = MochiPipeline.from_pretrained(model_dir(args, "tiny"), torch_dtype=torch.float32, device="cpu")
    try:
        cpu_pipe(PROMPT, generator=foreign, output_type="latent", num_inference_steps=1, progress=False, **size)
        refused = None
    except ValueError as e:
        refused = str(e).split(":")[0]
    return {
        "noise_device": out.noise_device,
        "drawn_on": str(drawn.device),
        "differs_from_cpu": not torch.equal(drawn.cpu(), cpu_noise),
        "max_abs_diff": float((drawn.cpu() - cpu_noise).abs().max()),
        "finite": bool(torch.isfinite(out.frames).all()),
        "refused": refused,
    }


def stage_oom(args) -> dict:
    """A decode that runs out of memory: with the device capped (set_per_process_memory_fraction) just above what
    the weights hold, a full decode fails; the pipeline retries with a smaller plan, and if that fails too the CLI's
    generate writes the latents, which --decode_latents then decodes with the cap lifted."""
    from mochi_preview import infer
    from mochi_preview.pipeline import DecodeMemoryError
    from mochi_preview.settings import Settings

    device = device_of(args.cpu)
    pipe = load(args, "wide")
    size = sizes(args.cpu)
    settings = Settings(
        prompt=PROMPT, seed=0, width=size["width"], height=size["height"], num_frames=size["num_frames"],
        num_inference_steps=size["num_inference_steps"], guidance_scale=4.5,
    )  # fmt: skip
    out_dir = Path(args.work) / "oom"
    out_dir.mkdir(exist_ok=True)
    result: dict = {}
    last_step = size["num_inference_steps"] - 1

    def cap_the_decode(p, i, sigma, state):
        """After the last step, only the decode is left: cap the device memory now."""
        if i != last_step:
            return None
        if args.cpu:  # no memory cap on a CPU: every decode raises torch.OutOfMemoryError instead
            from mochi_preview import pipeline

            def out_of_memory(*a, **k):
                raise torch.OutOfMemoryError("out of memory (CPU stand-in for the capped GPU)")

            pipeline.vae_decode = out_of_memory
            result["cap"] = "none on the CPU: every decode raises torch.OutOfMemoryError (stand-in)"
            return None
        pipe.disable_vae_tiling()  # "full": the whole video at once, the first plan to fail
        torch.cuda.synchronize()
        total = torch.cuda.get_device_properties(device).total_memory
        allowed = torch.cuda.memory_allocated(device) + args.headroom_gib * GIB
        fraction = min(1.0, allowed / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        result["cap"] = f"fraction {fraction:.4f} ({allowed / GIB:.1f} GiB)"
        return None

    video = out_dir / "run.mp4"
    try:
        infer.generate(pipe, settings, video, infer.RunOptions(progress=False), callback=cap_the_decode)
        result.update(outcome="recovered", decoded_with=getattr(pipe, "last_decode_options", None))
    except DecodeMemoryError as e:
        latents = sorted(out_dir.glob("*.latents.safetensors"))
        result.update(outcome="latents written", latents=[str(p) for p in latents], attempts=e.attempts)
        result["message"] = str(e)[:400]
    finally:
        if args.cpu:
            from mochi_preview import pipeline
            from mochi_preview.vae.decode import decode

            pipeline.vae_decode = decode
        else:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    if result.get("latents"):
        del pipe
        from mochi_preview.pipeline import release_memory

        release_memory(device)
        decoded = out_dir / "decoded.mp4"
        argv = ["--decode_latents", result["latents"][0], "--output", str(decoded), "--quiet"]
        rc = infer.main(argv + (["--device", "cpu", "--vae_tiling", "off"] if args.cpu else []))
        result["decode_latents"] = {"rc": rc, "video": decoded.is_file()}
    return result


def stage_compile(args) -> dict:
    """VAE torch.compile: compilations counted over two lengths, full and streaming; compiled == eager."""
    import logging

    from torch._dynamo.utils import counters

    from mochi_preview.vae import Decoder, DecoderConfig, decode

    warnings: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "recompile" in record.getMessage():
                warnings.append(record.getMessage()[:200])

    logging.getLogger("torch._dynamo").addHandler(Catch(level=logging.WARNING))
    device = device_of(args.cpu)
    if args.cpu:
        config, dtype, hw, backend = (
            DecoderConfig(channels=(32,) * 4, num_res_blocks=(1,) * 5),
            torch.float32,
            (2, 3),
            "eager",
        )
    else:
        config, dtype, hw, backend = DecoderConfig(), torch.bfloat16, (12, 20), "inductor"
    with torch.device(device):
        decoder = randomize(Decoder(config)).to(dtype).eval()
    lengths = (2, 3)
    zs = [torch.randn(1, 12, t, *hw, generator=torch.Generator().manual_seed(t)).to(device) for t in lengths]

    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [decode(decoder, z, mode=m, **kw) for z in zs for m, kw in (("full", {}), ("streaming", {}))]

    eager = run()
    start = time.perf_counter()
    torch._dynamo.reset()
    counters.clear()
    decoder.compile_blocks(backend=backend)
    compiled = run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    again = time.perf_counter() - start
    blocks = sum(1 for m in decoder.modules() if type(m).__name__ == "ResBlock")
    return {
        "backend": backend,
        "resblocks": blocks,
        "decodes": len(eager),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompile_warnings": warnings,
        "max_abs_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(compiled, eager)),
        "first_s": round(first, 1),
        "again_s": round(again, 2),
    }


# ---- issue 18 §6: the DiT forward per attention backend, the VAE decode at 163 frames -------------------------------

DIT_FRAMES = (31, 163)
DIT_DEPTHS = (1, 2)  # per-block time = t(2) - t(1); a 48-block forward = t(1) + 47 x that


def estimate():
    """bench/estimate_h100.py as a module (its figures go beside the measured ones)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import estimate_h100

    return estimate_h100


def attention_variants(cpu: bool) -> list[tuple[str, str, object]]:
    """(label, package backend, SDPA kernel or None) for every attention path this machine has."""
    from torch.nn.attention import SDPBackend

    from mochi_preview.dit.attention import available_backends

    if cpu:
        return [("sdpa (CPU)", "sdpa", None)]
    out = [(f"sdpa {k.name.lower()}", "sdpa", k) for k in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                          SDPBackend.CUDNN_ATTENTION)]  # fmt: skip
    out += [(b, b, None) for b in available_backends() if b in ("flash", "sage")]
    return out


def timed(fn, device: torch.device, repeats: int = 2, warmup: bool = True) -> float:
    """Median seconds of `fn()` (after one warm-up call), the device synchronised around each call."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def stage_dit(args) -> dict:
    """The published-width DiT forward (B = 1, cond) at 848x480 x 31 and 163 frames with 1 and 2 blocks, per attention
    path: seconds per block, a 48-block forward and a 64-step CFG run extrapolated, TFLOP/s against the FLOP count,
    peak memory; beside bench/estimate_h100.py's range for the same forward."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    from mochi_preview.configs import CONFIGS
    from mochi_preview.dit import AsymmDiT

    est, device = estimate(), device_of(args.cpu)
    published = CONFIGS["tiny" if args.cpu else "mochi-1-preview"].dit
    dtype = torch.float32 if args.cpu else torch.bfloat16
    hw = (4, 6) if args.cpu else (480 // 8, 848 // 8)
    frames_list = (7, 13) if args.cpu else DIT_FRAMES
    valid = est.TEXT_VALID
    rows = []
    models = {}
    for depth in DIT_DEPTHS:
        with torch.device(device):
            models[depth] = randomize(AsymmDiT(replace(published, depth=depth))).to(dtype).eval()
    for frames in frames_list:
        t = (frames - 1) // 6 + 1
        g = torch.Generator().manual_seed(frames)
        x = torch.randn(1, published.in_channels, t, *hw, generator=g).to(device, dtype)
        feats = torch.randn(1, 256, published.text_dim, generator=g).to(device, dtype)
        mask = torch.zeros(1, 256, dtype=torch.bool, device=device)
        mask[0, :valid] = True
        sigma = torch.tensor([0.6], device=device)
        n = t * hw[0] * hw[1] // published.patch_size**2
        for label, backend, kernel in attention_variants(args.cpu):
            row = {"frames": frames, "tokens": n, "attention": label}
            try:
                seconds = {}
                for depth, model in models.items():
                    model.set_attention(backend)
                    reset_peak(device)
                    with torch.inference_mode(), sdpa_kernel([kernel]) if kernel is not None else nullcontext():
                        seconds[depth] = timed(partial(model, x, sigma, feats, mask), device)
                    row[f"peak_{depth}"] = peak(device)
                per_block = max(seconds[2] - seconds[1], 1e-9)
                forward48 = seconds[1] + (published.depth - 1) * per_block
                flops = est.dit_forward_flops(replace(published, depth=1), n, valid)
                block_flops = sum(flops.values()) - flops["other"]
                row.update(s_block=per_block, s_forward_48=forward48, min_video=128 * forward48 / 60,
                           tflops=block_flops / per_block / 1e12)  # fmt: skip
            except Exception as e:  # a kernel this GPU or shape does not take: recorded, the others still run
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            rows.append(row)
    estimates = {}
    if not args.cpu:
        for frames in frames_list:
            n = est.visual_tokens(frames)
            estimates[frames] = [est.dit_forward_seconds(est.DIT, n, valid, c) for c in (est.LOW, est.HIGH)]
    return {"rows": rows, "estimate_s_forward": estimates, "dtype": str(dtype)}


def stage_vae(args) -> dict:
    """The published VAE decoder (random weights) decoding 163 frames at 848x480, streaming and tiled: seconds (one
    cold call each: cuDNN's first-call planning included) and peak device memory, beside the estimate's decode time."""
    from mochi_preview.vae import Decoder, DecoderConfig, decode

    est, device = estimate(), device_of(args.cpu)
    if args.cpu:
        config, dtype, frames, hw = (
            DecoderConfig(channels=(32,) * 4, num_res_blocks=(1,) * 5),
            torch.float32,
            13,
            (4, 6),
        )
    else:
        config, dtype, frames, hw = DecoderConfig(), torch.bfloat16, 163, (480 // 8, 848 // 8)
    with torch.device(device):
        decoder = randomize(Decoder(config)).to(dtype).eval()
    z = torch.randn(1, 12, (frames - 1) // 6 + 1, *hw, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    rows = []
    for mode, kw in (("streaming", {"frames_per_chunk": 1}), ("tiled", {})):
        reset_peak(device)
        try:
            with torch.inference_mode():
                seconds = timed(partial(decode, decoder, z, mode=mode, **kw), device, repeats=1, warmup=False)
            rows.append({"mode": mode, "seconds": seconds, "peak": peak(device)})
        except torch.OutOfMemoryError as e:
            rows.append({"mode": mode, "error": f"out of memory: {str(e).splitlines()[0]}"[:160]})
    estimate_s = {} if args.cpu else {
        p: [est.vae_seconds(est.DECODER, frames, p, c) for c in (est.LOW, est.HIGH)] for p in ("full", "tiled")
    }  # fmt: skip
    return {"frames": frames, "rows": rows, "estimate_s": estimate_s}


# ---- the report --------------------------------------------------------------------------------------------------


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def stage_report(args) -> None:
    rows = [json.loads(line) for line in (Path(args.work) / "results.jsonl").read_text().splitlines() if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["stage"], []).append(r)
    env = (by.get("env") or [{}])[-1]
    where = env.get("device", "CPU (dry run: GPU checks replaced by CPU stand-ins)")
    print(f"## bench/gpu_check.sh: {where}, torch {env.get('torch', '?')}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| memory mode | load peak GiB | sampling peak GiB | s/step | GB to the device (T5 / sampling) | attention |")
    print("|---|---|---|---|---|---|")
    for r in by.get("mode", []):
        if not r.get("ok"):
            print(f"| {r.get('mode', '?')} | failed: {r.get('error', '?')} | | | | |")
            continue
        moved = f"{gb(r.get('moved_text'))} / {gb(r.get('moved_dit'))}"
        print(f"| {r['mode']} | {gib(r['load_peak'])} | {gib(r['sampling_peak'])} | {r['s_per_step']:.3f} | {moved} | "
              f"{r['attention']} |")  # fmt: skip
    print("\n| check | result |\n|---|---|")
    for name, describe in (("noise", _noise), ("oom", _oom), ("compile", _compile), ("models", _models)):
        for r in by.get(name, []):
            try:
                text = describe(r) if r.get("ok") else "FAILED: " + r.get("error", "?")
            except (KeyError, TypeError, ValueError):  # a result this report does not know how to read: as it is
                text = json.dumps(r, default=str)
            print(f"| {name} | {text.replace('|', chr(92) + '|')} |")
    for r in by.get("dit", []):
        print(_dit(r) if r.get("ok") else f"\nDiT forward: FAILED: {r.get('error', '?')}")
    for r in by.get("vae", []):
        print(_vae(r) if r.get("ok") else f"\nVAE decode: FAILED: {r.get('error', '?')}")
    for r in rows:
        if r["stage"] not in ("env", "mode", "noise", "oom", "compile", "models", "dit", "vae") and not r.get("ok"):
            print(f"| {r['stage']} | {r.get('error', 'failed')} |")


def _dit(r) -> str:
    lines = [f"\nDiT forward at the published width ({r['dtype']}, B = 1, 40 valid text tokens; the tiny model in a "
             "dry run), per attention path; the whole depth and the 64-step CFG video (128 forwards) extrapolated "
             "from 1 and 2 blocks:\n",
             "| frames | tokens | attention | s / block | s / forward (all blocks) | estimate s / forward "
             "| min / video | TFLOP/s (blocks) | peak GiB (1 / 2 blocks) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        est = r.get("estimate_s_forward", {}).get(str(row["frames"]))  # JSON keys are strings
        est_text = f"{est[0]:.2f}–{est[1]:.2f}" if est else "-"
        if "error" in row:
            lines.append(
                f"| {row['frames']} | {row['tokens']} | {row['attention']} | {row['error']} | | {est_text} | | | |"
            )
            continue
        lines.append(f"| {row['frames']} | {row['tokens']} | {row['attention']} | {row['s_block']:.4f} | "
                     f"{row['s_forward_48']:.2f} | {est_text} | {row['min_video']:.1f} | {row['tflops']:.0f} | "
                     f"{gib(row.get('peak_1'))} / {gib(row.get('peak_2'))} |")  # fmt: skip
    return "\n".join(lines)


def _vae(r) -> str:
    est = r.get("estimate_s", {})
    lines = [f"\nVAE decode of {r['frames']} frames (published decoder, random weights; estimate: full "
             f"{_range(est.get('full'))} s, tiled {_range(est.get('tiled'))} s):\n",
             "| mode | seconds | peak GiB |", "|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | {row['error']} | |")
        else:
            lines.append(f"| {row['mode']} | {row['seconds']:.1f} | {gib(row.get('peak'))} |")
    return "\n".join(lines)


def _range(pair) -> str:
    return f"{pair[0]:.1f}–{pair[1]:.1f}" if pair else "-"


def _noise(r) -> str:
    return (
        f"drawn on {r['drawn_on']} (MochiOutput.noise_device {r['noise_device']}), differs from the CPU noise of the "
        f"same seed: {r['differs_from_cpu']} (max |diff| {r['max_abs_diff']:.2f}); a generator on another device "
        f"than the pipeline's refused: {r['refused'] or 'NO'}"
    )


def _oom(r) -> str:
    text = f"cap {r.get('cap', '(not set: the decode was not reached)')}: {r['outcome']}"
    if r["outcome"] == "recovered":
        return text + f" (decoded with {r['decoded_with']})"
    d = r.get("decode_latents") or {}
    return text + f" ({', '.join(r['latents'])}); --decode_latents: rc {d.get('rc')}, video written {d.get('video')}"


def _compile(r) -> str:
    return (
        f"{r['backend']}: {r['graphs']} compiled graphs for {r['resblocks']} ResBlocks x {r['decodes']} decodes "
        f"(2 lengths, full + streaming); recompile warnings: {len(r['recompile_warnings'])}; max |compiled - eager| "
        f"{r['max_abs_diff']:.2e}; first run {r['first_s']} s, again {r['again_s']} s"
    )


def _models(r) -> str:
    return f"built in {r['seconds']} s: " + ", ".join(
        f"{k} {v}" for k, v in r.items() if k not in ("stage", "ok", "seconds")
    )


STAGES = {
    "env": stage_env,
    "models": stage_models,
    "mode": stage_mode,
    "noise": stage_noise,
    "oom": stage_oom,
    "compile": stage_compile,
    "dit": stage_dit,
    "vae": stage_vae,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "report"])
    parser.add_argument("--work", required=True, help="the run's folder: models, outputs, results.jsonl")
    parser.add_argument("--cpu", action="store_true", help="the dry run: CPU, toy sizes, stand-ins for the GPU")
    parser.add_argument("--memory", choices=["resident", "model", "sequential"], default="resident")
    parser.add_argument("--headroom_gib", type=float, default=1.0, help="oom: device memory allowed beyond weights")
    args = parser.parse_args()
    if args.stage == "report":
        stage_report(args)
        return 0
    torch.set_num_threads(2 if args.cpu else torch.get_num_threads())
    result = {"stage": args.stage}
    try:
        result.update(STAGES[args.stage](args), ok=True)
    except Exception as e:  # recorded for the report; the other stages still run
        traceback.print_exc()
        result.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        if args.stage == "mode":
            result["mode"] = args.memory
    with open(Path(args.work) / "results.jsonl", "a") as f:
        f.write(json.dumps(result, default=str) + "\n")
    print(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
