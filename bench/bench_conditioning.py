"""Image to video, video to video and extension measured on the shipped demo model (issue 17, item 5).

    python bench/bench_conditioning.py [--cases 40] [--steps 12] [--v2v_cases 4] [--threads 2]

Every clip comes from the demo world (`mochi_preview.demo.world`) at a random start position, with a caption naming
its colour, shape and direction; `demo.evaluate.observe` reads those back from the generated frames. Generations run
batched through the pipeline's own pieces (`pipe.prepare`, `conditioning.anchor` / `start_from`, `pipe.sample`,
`pipe.decode`): the code `pipe(prompt, image=...)` runs, several videos at a time. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from mochi_preview import conditioning
from mochi_preview.demo import world
from mochi_preview.demo.evaluate import _as_frames, object_masks, observe
from mochi_preview.pipeline import MochiPipeline
from mochi_preview.tiny import DEMO_MODEL_DIR

FRAMES = 25  # the demo model's clip length


def clips(rng: np.random.Generator, n: int) -> tuple[list[world.Attributes], np.ndarray, list[str]]:
    """n demo-world clips (n, T, H, W, 3) uint8 at random start positions, with their attributes and captions."""
    config = world.WorldConfig(frames=FRAMES)
    attrs = world.sample_attributes(rng, n, "train", config)
    video = world.render(attrs, world.sample_geometry(rng, attrs, config), config)  # (n, 3, T, H, W)
    return attrs, video.permute(0, 2, 3, 4, 1).numpy(), [world.caption(rng, a) for a in attrs]


def generate(pipe, prompts, steps, seed, make) -> np.ndarray:
    """Videos (B, T, H, W, 3) uint8 for `prompts`, their start and steering made by `make(noise, sigmas)`."""
    request = pipe.prepare(prompts, num_inference_steps=steps, seed=seed, num_frames=FRAMES)
    c = make(request.latents, request.sigmas)
    request = replace(request, latents=c.latents, conditioning=c, sigmas=c.sigmas or request.sigmas)
    z = pipe.sample(request, progress=False)  # runs the request's conditioning: its after_step and dit_hook
    return (pipe.decode(z, "np") * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def centroids(frames: np.ndarray) -> np.ndarray:
    """(T, 2) object centroid (x, y) in pixels per frame; NaN where no object is seen."""
    masks = object_masks(_as_frames(frames))
    out = np.full((len(frames), 2), np.nan)
    for i, m in enumerate(masks):
        if m.sum() >= 4:
            ys, xs = np.nonzero(m)
            out[i] = xs.mean(), ys.mean()
    return out


def encode_all(pipe, videos: np.ndarray) -> torch.Tensor:
    return torch.cat([pipe._encode_pixels(v) for v in videos])


def image_to_video(pipe, args, rng) -> list[dict]:
    attrs, videos, prompts = clips(rng, args.cases)
    x = encode_all(pipe, videos[:, :1])  # (n, 12, 1, h, w)
    rows = []
    # guide at strength 1 is the replace path in exact arithmetic (the velocity that reaches x from a point on the
    # anchor's path is that path's own velocity); at 0.5 it is the softer variant
    for mode, strength in (("replace", 1.0), ("guide", 1.0), ("guide", 0.5)):
        start, out = time.perf_counter(), []
        for lo in range(0, args.cases, args.batch):
            hi = min(lo + args.batch, args.cases)

            def make(noise, sigmas, xs=x[lo:hi], mode=mode, strength=strength):
                return conditioning.anchor(noise, xs, sigmas, mode, strength=strength)

            out.append(generate(pipe, prompts[lo:hi], args.steps, args.seed + lo, make))
        out = np.concatenate(out)
        seen = [observe(v) for v in out]
        err = [np.linalg.norm(centroids(v[:1])[0] - centroids(c[:1])[0]) for v, c in zip(out, videos)]
        rows.append(
            {
                "mode": mode if mode == "replace" else f"{mode} (strength {strength:g})",
                "cases": args.cases,
                "first-frame PSNR (dB), mean / min": _mean_min([psnr(v[0], c[0]) for v, c in zip(out, videos)]),
                "colour kept": _share(o.colour == a.colour for o, a in zip(seen, attrs)),
                "shape kept": _share(o.shape == a.shape for o, a in zip(seen, attrs)),
                "start centroid error (px), mean / max": _mean_max(err),
                "direction as prompted": _share(o.direction == a.direction for o, a in zip(seen, attrs)),
                "seconds": f"{time.perf_counter() - start:.0f}",
            }
        )
    ceiling = (pipe.decode(encode_all(pipe, videos), "np") * 255).astype(np.uint8)  # the VAE's own round trip
    seen = [observe(v) for v in ceiling]
    rows.append(
        {
            "mode": "(VAE round trip of the clip)",
            "cases": args.cases,
            "first-frame PSNR (dB), mean / min": _mean_min([psnr(v[0], c[0]) for v, c in zip(ceiling, videos)]),
            "colour kept": _share(o.colour == a.colour for o, a in zip(seen, attrs)),
            "shape kept": _share(o.shape == a.shape for o, a in zip(seen, attrs)),
            "direction as prompted": _share(o.direction == a.direction for o, a in zip(seen, attrs)),
        }
    )
    free = generate(pipe, prompts[: args.batch], args.steps, args.seed, lambda n, s: conditioning.Conditioning(n))
    rows.append(
        {
            "mode": "(text only)",
            "cases": len(free),
            "first-frame PSNR (dB), mean / min": _mean_min([psnr(v[0], c[0]) for v, c in zip(free, videos)]),
            "start centroid error (px), mean / max": _mean_max(
                [np.linalg.norm(centroids(v[:1])[0] - centroids(c[:1])[0]) for v, c in zip(free, videos)]
            ),
        }
    )
    return rows


def video_to_video(pipe, args, rng) -> list[dict]:
    attrs, videos, _ = clips(rng, args.v2v_cases)
    x = encode_all(pipe, videos)  # (n, 12, T', h, w)
    # A new prompt: another colour and the opposite direction, the same shape
    turn = {"left": "right", "right": "left", "up": "down", "down": "up"}
    colours = list(world.COLOURS)
    new = [world.Attributes(colours[(colours.index(a.colour) + 3) % len(colours)], a.shape, turn[a.direction])
           for a in attrs]  # fmt: skip
    prompts = [world.caption(rng, a) for a in new]
    paths = [centroids(v) for v in videos]
    rows = []
    for strength in np.round(np.linspace(0.1, 1.0, 10), 2):
        sigmas = conditioning.cut_schedule(float(strength), args.v2v_steps)
        make = lambda noise, _: conditioning.start_from(noise, x, float(strength), sigmas)  # noqa: B023, E731
        out = generate(pipe, prompts, args.v2v_steps, args.seed, make)
        seen = [observe(v) for v in out]
        path_err = [np.nanmean(np.linalg.norm(centroids(v) - p, axis=1)) for v, p in zip(out, paths)]
        rows.append(
            {
                "strength": f"{strength:.1f}",
                "input colour kept": _share(o.colour == a.colour for o, a in zip(seen, attrs)),
                "input direction kept": _share(o.direction == a.direction for o, a in zip(seen, attrs)),
                "path distance to input (px)": f"{np.nanmean(path_err):.1f}",
                "PSNR vs input (dB)": f"{np.mean([psnr(v, c) for v, c in zip(out, videos)]):.1f}",
                "new colour followed": _share(o.colour == a.colour for o, a in zip(seen, new)),
                "new direction followed": _share(o.direction == a.direction for o, a in zip(seen, new)),
            }
        )
    return rows


def extension(pipe, args, rng) -> list[dict]:
    attrs, videos, prompts = clips(rng, args.v2v_cases)
    # The world's own clips (full travel: an object often ends near the frame's edge, with little room to go on)
    x = encode_all(pipe, np.stack([conditioning.extension_frames(v) for v in videos]))  # (n, 12, 2, h, w)
    make = lambda noise, sigmas: conditioning.anchor(noise, x, sigmas, args.mode)  # noqa: E731
    out = generate(pipe, prompts, args.steps, args.seed, make)
    k = conditioning.MIN_VIDEO_FRAMES
    joined = np.concatenate([videos, out[:, k:]], axis=1)  # the input, then the new frames (what the pipeline returns)
    t = videos.shape[1]
    change = np.abs(np.diff(joined.astype(np.float32), axis=1)).mean(axis=(2, 3, 4))  # (n, T-1) mean |frame diff|
    seam = change[:, t - 1]
    inside = np.median(change[:, : t - 1], axis=1)
    new = np.median(change[:, t:], axis=1)
    anchored = [psnr(o[:k], v[-k:]) for o, v in zip(out, videos)]
    return [
        {
            "cases": len(videos),
            "seam change (mean abs diff, 0-255)": f"{seam.mean():.2f}",
            "typical change in the input": f"{inside.mean():.2f}",
            "typical change in the new frames": f"{new.mean():.2f}",
            "seam / typical": f"{(seam / inside).mean():.2f}",
            "anchored frames vs input end, PSNR (dB)": f"{np.mean(anchored):.1f}",
            "direction kept in the new frames": _share(
                observe(o[k:]).direction == a.direction for o, a in zip(out, attrs)
            ),
        }
    ]


def _share(flags) -> str:
    flags = list(flags)
    return f"{100 * sum(flags) / len(flags):.0f}% ({sum(flags)}/{len(flags)})"


def _mean_min(values) -> str:
    return f"{np.mean(values):.1f} / {np.min(values):.1f}"


def _mean_max(values) -> str:
    v = np.array(values, dtype=np.float64)
    return f"{np.nanmean(v):.1f} / {np.nanmax(v):.1f}" + (f" ({np.isnan(v).sum()} unseen)" if np.isnan(v).any() else "")


def table(title: str, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=40, help="image-to-video cases (per mode)")
    p.add_argument("--steps", type=int, default=24, help="sampling steps (the demo model's default)")
    p.add_argument("--batch", type=int, default=20, help="videos per sampling batch")
    p.add_argument("--v2v_cases", type=int, default=8, help="clips per strength (video to video) and extensions")
    p.add_argument("--v2v_steps", type=int, default=12, help="steps below each strength (video to video)")
    p.add_argument("--mode", default="replace", choices=conditioning.MODES, help="the extension's anchoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=("i2v", "v2v", "ext"), default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32, device="cpu")
    start = time.perf_counter()
    parts = {"i2v": ("Image to video", image_to_video), "v2v": ("Video to video", video_to_video),
             "ext": ("Extension", extension)}  # fmt: skip
    for key, (title, run) in parts.items():
        if args.only in (None, key):
            rng = np.random.default_rng([args.seed, list(parts).index(key)])
            steps = args.v2v_steps if key == "v2v" else args.steps
            print(table(f"{title} (demo model, {steps} steps)", run(pipe, args, rng)), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
