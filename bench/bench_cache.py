"""Step caching (issue 18.2): DiT calls saved, time per video and quality at three thresholds per cache.

    python bench/bench_cache.py [--parts demo wide pieces] [--specs teacache:0.06 ...] [--json results.json]
        [--depth 2 --steps 12 --frames 1 --guidance 1 --out_dir DIR] [--threads 2]

- demo: the shipped demo model at its defaults on every seventh of the evaluator's 45 held-out prompts (7 clips,
  7 of the 9 held-out combinations, one batch, seed 0, branches run one by one): reused calls, seconds per
  video, PSNR of the frames against the uncached run, and the evaluator's colour / direction / shape (accuracy, and
  agreement with the uncached run).
- wide: a random DiT of the published width (3072 wide, 24 heads, text 1536 / 4096; fp32, weights from seed 0,
  random prompt embeddings of T5-XXL's shape) with `--depth` blocks at the real latent size 848x480 x `--frames`
  (1 frame: one latent frame, 1590 tokens; 7 frames: two, 3180 tokens), `--steps` linear-quadratic steps, CFG
  `--guidance` (branches batched): DiT calls reused, seconds per video (wall and CPU) and PSNR of the final latents
  (peak = their range; no VAE) against the uncached run of the same seed; the uncached run also notes TeaCache's
  indicator change per step.
- pieces: the same published-width DiT at the real latent size 848x480x31 (9540 tokens): seconds of each piece of a
  DiT call (embedding, TeaCache's indicator, block 0, the final layer), extrapolated to 48 blocks (every block
  costing block 0's time), giving the seconds of a computed call and of a reused call per cache.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mochi_preview.cache import _prepare, make_cache_hook, relative_l1, teacache_rescale
from mochi_preview.dit.layers import modulated_rms_norm
from mochi_preview.dit.model import AsymmDiT, DiTConfig, init_weights
from mochi_preview.geometry import MOCHI
from mochi_preview.sampling import DiTCall, TextCondition, denoise, linear_quadratic_schedule

SPECS = [None, "teacache:0.03", "teacache:0.06", "teacache:0.09", "first_block:0.03", "first_block:0.05",
         "first_block:0.1"]  # fmt: skip


def psnr(x: np.ndarray, ref: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def demo_runs(specs: list[str | None]) -> list[dict]:
    """The demo model on the evaluator's held-out prompts, once per cache spec."""
    from mochi_preview.demo.evaluate import adherence
    from mochi_preview.demo.evaluate_model import heldout_prompts, model_defaults
    from mochi_preview.pipeline import MochiPipeline
    from mochi_preview.tiny import demo_model_dir

    folder = demo_model_dir()
    pipe = MochiPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    cases = heldout_prompts(0)[::7]
    defaults = model_defaults(folder)
    rows, reference = [], None
    for spec in specs:
        videos, calls, reused, dit_seconds = [], 0, 0, 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(cases), 16):
            hook = make_cache_hook(spec)
            g = torch.Generator().manual_seed(i)
            count = {"n": 0}

            def counting(call: DiTCall, hook=hook, count=count) -> torch.Tensor:
                count["n"] += 1
                return call() if hook is None else hook(call)

            prompts = [p for p, _ in cases[i : i + 16]]
            kw = dict(generator=g, output_type="np", progress=False, batch_cfg=False, dit_hook=counting)
            out = pipe(prompts, **kw, **defaults)
            videos.append(np.asarray(out.frames))
            dit_seconds += out.timings.get("dit", float("nan"))
            calls += count["n"]
            reused += hook.record()["reused"] if hook is not None else 0
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        videos = np.concatenate(videos)
        scores = adherence(list(videos), [a for _, a in cases])
        if reference is None:
            reference = (videos, scores["observations"])
        seen, ref_seen = scores["observations"], reference[1]
        same = {k: float(np.mean([getattr(a, k) == getattr(b, k) for a, b in zip(seen, ref_seen)])) for k in
                ("colour", "direction", "shape")}  # fmt: skip
        rows.append(dict(
            cache=spec or "off", calls=calls, reused=reused, seconds_per_video=seconds / len(cases),
            cpu_seconds_per_video=cpu / len(cases),
            dit_seconds_per_video=dit_seconds / len(cases), psnr=psnr(videos, reference[0]),
            accuracy={k: scores[k] for k in ("colour", "direction", "shape", "all")}, agreement=same,
        ))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def wide_dit(depth: int = 2) -> AsymmDiT:
    return init_weights(AsymmDiT(DiTConfig(depth=depth)), generator=torch.Generator().manual_seed(0)).eval()


def wide_text(valid: int, seed: int) -> TextCondition:
    features = torch.randn(1, 256, 4096, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 256, dtype=torch.bool)
    mask[:, :valid] = True
    return TextCondition(features, mask)


class IndicatorTrace:
    """A dit_hook that runs the DiT unchanged and notes the relative L1 change of TeaCache's indicator per call."""

    def __init__(self):
        self.previous, self.changes = None, []

    def __call__(self, call: DiTCall) -> torch.Tensor:
        f = _prepare(call)
        m = modulated_rms_norm(f.x, call.model.blocks[0].mod_x(f.c_act).chunk(4, dim=-1)[0])
        if self.previous is not None:
            self.changes.append(relative_l1(m, self.previous))
        self.previous = m
        return call()


def wide_runs(
    specs: list[str | None], dit: AsymmDiT, steps: int, frames: int, guidance: float, out_dir: Path | None = None
) -> list[dict]:
    """Full sampling runs of the published-width DiT at 848x480 x `frames`, once per cache spec (the first: None).

    Resumable: with `out_dir`, each run's final latents (safetensors) and row (json) are kept there and a rerun
    skips the specs already done.
    """
    from safetensors.torch import load_file, save_file

    from mochi_preview.files import write_atomic

    z = torch.randn(1, *MOCHI.latent_shape(frames, 480, 848), generator=torch.Generator().manual_seed(0))
    cond, uncond = wide_text(40, 1), wide_text(1, 2)
    sigmas = linear_quadratic_schedule(steps)
    rows, reference = [], None
    for spec in specs:
        name = (spec or "off").replace(":", "_")
        done = out_dir / f"{name}.json" if out_dir else None
        if done is not None and done.exists():
            out = load_file(out_dir / f"{name}.safetensors")["latents"].numpy()
            row = json.loads(done.read_text())
        else:
            hook = make_cache_hook(spec)
            start, cpu = time.perf_counter(), time.process_time()
            trace = IndicatorTrace()
            with torch.no_grad():
                out = denoise(dit, z, sigmas, cond, uncond, guidance, batch_cfg=True, dit_hook=hook or trace).numpy()
            record = hook.record() if hook else dict(reused=0, reused_steps={})
            row = dict(
                cache=spec or "off", calls=steps, reused=record["reused"], reused_steps=record["reused_steps"],
                seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
            )  # fmt: skip
            if hook is None:  # the uncached run: TeaCache's indicator change at each step, as it would see it
                row["rel_l1"] = trace.changes
                row["rescaled"] = [teacache_rescale(r) for r in trace.changes]
            if out_dir is not None:
                kept, text = {"latents": torch.from_numpy(out).contiguous()}, json.dumps(row)
                write_atomic(out_dir / f"{name}.safetensors", lambda t, k=kept: save_file(k, str(t)), replace=True)
                write_atomic(done, lambda t, text=text: t.write_text(text), replace=True)
        reference = out if reference is None else reference
        row["latent_psnr"] = psnr(out, reference, peak=float(reference.max() - reference.min()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def piece_times(dit: AsymmDiT, frames: int = 31, height: int = 480, width: int = 848, depth: int = 48) -> dict:
    """Seconds of each piece of one DiT call at a real latent size, and a whole call extrapolated to `depth`."""
    z = torch.randn(1, *MOCHI.latent_shape(frames, height, width), generator=torch.Generator().manual_seed(0))
    call = DiTCall(dit, 1, 0.9, z, wide_text(40, 1), "cond", 64)
    with torch.no_grad():
        f, prepare = timed(lambda: _prepare(call))
        _, indicator = timed(lambda: modulated_rms_norm(f.x, dit.blocks[0].mod_x(f.c_act).chunk(4, dim=-1)[0]))
        (x, _), block = timed(lambda: dit.blocks[0](f.x, f.y, f.c_act, f.rope, f.attn, dit.token_layout))
        _, final = timed(lambda: f.project(f.final_norm(x)))
    computed = prepare + depth * block + final
    return dict(
        latent=f"{width}x{height}x{frames}", tokens=f.x.shape[1], prepare=prepare, indicator=indicator, block=block,
        final=final, depth=depth, computed_call=computed, teacache_computed_call=computed + indicator,
        teacache_reused_call=prepare + indicator + final, first_block_reused_call=prepare + block + final,
    )  # fmt: skip


def markdown(results: dict) -> str:
    lines = []
    if "demo" in results:
        lines += [
            "| cache | DiT calls | reused | s/video | CPU s/video | PSNR dB | colour | direction | shape | all | "
            "same colour/direction/shape as uncached |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["demo"]:
            a, s = r["accuracy"], r["agreement"]
            lines.append(
                f"| {r['cache']} | {r['calls']} | {r['reused']} ({r['reused'] / r['calls']:.0%}) | "
                f"{r['seconds_per_video']:.2f} | {r['cpu_seconds_per_video']:.2f} | {r['psnr']:.1f} | "
                f"{a['colour']:.2f} | {a['direction']:.2f} | {a['shape']:.2f} | {a['all']:.2f} | "
                f"{s['colour']:.2f} / {s['direction']:.2f} / {s['shape']:.2f} |"
            )
        lines.append("")
    if "wide" in results:
        lines += ["| cache | DiT calls | reused | reused steps | wall s/run | CPU s/run | latent PSNR dB |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["wide"]:
            steps = ", ".join(str(s) for v in r["reused_steps"].values() for s in v)
            lines.append(f"| {r['cache']} | {r['calls']} | {r['reused']} ({r['reused'] / r['calls']:.0%}) | {steps} | "
                         f"{r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['latent_psnr']:.1f} |")  # fmt: skip
        lines.append("")
    if "pieces" in results:
        p = results["pieces"]
        lines.append(f"Pieces at {p['latent']} ({p['tokens']} tokens), seconds: " + ", ".join(
            f"{k} {p[k]:.2f}" for k in ("prepare", "indicator", "block", "final")) + ".")  # fmt: skip
        lines.append(
            f"Extrapolated to {p['depth']} blocks: computed call {p['computed_call']:.0f} s, TeaCache reused call "
            f"{p['teacache_reused_call']:.1f} s, First-Block-Cache reused call {p['first_block_reused_call']:.1f} s."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["demo", "wide", "pieces"], choices=["demo", "wide", "pieces"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", nargs="+", default=SPECS[1:], help="cache specs to compare with the uncached run")
    parser.add_argument("--depth", type=int, default=2, help="wide/pieces: blocks of the published-width DiT")
    parser.add_argument("--steps", type=int, default=12, help="wide: sampling steps (linear-quadratic schedule)")
    parser.add_argument("--frames", type=int, default=1, help="wide: video frames at 848x480 (7: 2 latent frames)")
    parser.add_argument("--guidance", type=float, default=1.0, help="wide: CFG scale (1: the prompt alone)")
    parser.add_argument("--out_dir", type=Path, help="wide: keep each run here and skip runs already there")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if "demo" in args.parts:
        results["demo"] = demo_runs([None, *args.specs])
    if {"wide", "pieces"} & set(args.parts):
        dit = wide_dit(args.depth)
        if "pieces" in args.parts:
            results["pieces"] = piece_times(dit)
            print(json.dumps(results["pieces"]), flush=True)
        if "wide" in args.parts:
            results["wide"] = wide_runs([None, *args.specs], dit, args.steps, args.frames, args.guidance, args.out_dir)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
