"""VAE decode: peak memory and time of our decode modes next to diffusers' AutoencoderKLMochi, same weights, one run.

The weights are a random quarter-width decoder (channels 32/64/128/192, the published proportions, so the pixel-side
level dominates memory as at full size), written once by diffusers' save_pretrained; ours loads that folder through
load_vae_decoder, diffusers through from_pretrained. Every case runs in a fresh process that reports the peak RSS
added by the decode alone (VmHWM reset through /proc/self/clear_refs just before it, minus the RSS at that moment)
and the process's peak RSS. Both sides decode under torch.no_grad() with the same thread count.

1. Frames sweep at a fixed spatial size: full decode vs temporal streaming (ours) vs diffusers untiled.
2. One larger output size: ours full / streaming / tiled / tiled+streaming / auto vs diffusers untiled / tiled.
   diffusers' decoder is not the native function (frame dropping, spec 12), so only time and memory are compared
   here; correctness is in tests/vae. (diffusers' framewise decoding is not measured: in 0.42.1 it fails on the
   Mochi VAE, because switching pad_mode to "constant" after construction leaves its convs without spatial padding.)

    python bench/bench_vae.py [--threads 1] [--frames 2 4 8 16] [--size 16] [--big 3 40]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHANNELS = (32, 64, 128, 192)
LAYERS = (1, 1, 1, 1, 1)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(spec: dict) -> dict:
    """One decode in this (fresh) process; returns seconds, added peak RSS and the process peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    t, h, w = spec["latent"]
    z = torch.randn(1, 12, t, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if spec["impl"] == "ours":
            from mochi_preview.vae import decode, load_vae_decoder

            decoder = load_vae_decoder(spec["folder"])
            # Warm-up: oneDNN initialisation is not the decode's memory.
            decode(decoder, z[:, :, :1, :2, :2], mode="full")
            run = lambda: decode(decoder, z, **spec["options"])  # noqa: E731
        else:
            from diffusers import AutoencoderKLMochi

            vae = AutoencoderKLMochi.from_pretrained(spec["folder"] + "/vae").eval()
            vae.decode(z[:, :, :1, :2, :2])
            if spec["options"].get("tiling"):
                vae.enable_tiling()
            run = lambda: vae.decode(z).sample  # noqa: E731
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status()["VmRSS"]
        start = time.perf_counter()
        video = run()
        seconds = time.perf_counter() - start
    peak = _status()["VmHWM"]
    return {"seconds": seconds, "added": peak - before, "peak": peak, "shape": list(video.shape)}


def measure(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case {spec} failed:\n{done.stderr[-3000:]}")
    return {**spec, **json.loads(done.stdout.strip().splitlines()[-1])}


def make_weights(folder: Path) -> None:
    """A random diffusers AutoencoderKLMochi (quarter-width decoder), saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=CHANNELS, layers_per_block=LAYERS
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(vae.named_parameters()):
            if p.ndim == 1:
                p.copy_(
                    (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + 0.1 * torch.randn(p.shape, generator=g)
                )
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8, 16], help="latent frames in the sweep")
    ap.add_argument("--size", type=int, default=16, help="latent height = width in the sweep")
    ap.add_argument("--big", type=int, nargs=2, default=[3, 40], help="latent frames and size of the comparison")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        make_weights(Path(tmp))
        base = {"folder": tmp, "threads": args.threads}
        print(f"decoder channels {CHANNELS}, ResBlocks {LAYERS}, {args.threads} thread(s), fp32\n")

        print(
            "### Frames sweep: latent (12, T, {0}, {0}) -> video (3, 6T-5, {1}, {1})\n".format(args.size, 8 * args.size)
        )
        print("| T latent | video frames | ours full: s / added MiB | ours streaming: s / added MiB | "
              "diffusers untiled: s / added MiB |")  # fmt: skip
        print("|---|---|---|---|---|")
        for t in args.frames:
            latent = [t, args.size, args.size]
            cases = [
                {"impl": "ours", "options": {"mode": "full"}},
                {"impl": "ours", "options": {"mode": "streaming", "frames_per_chunk": 1}},
                {"impl": "diffusers", "options": {}},
            ]
            r = [measure({**base, **c, "latent": latent}) for c in cases]
            cells = " | ".join(f"{x['seconds']:.1f} / {mib(x['added'])}" for x in r)
            print(f"| {t} | {6 * t - 5} | {cells} |", flush=True)

        t, s = args.big
        latent = [t, s, s]
        print(f"\n### Same output: latent (12, {t}, {s}, {s}) -> video (3, {6 * t - 5}, {8 * s}, {8 * s})\n")
        cases = [
            ("ours full", {"impl": "ours", "options": {"mode": "full"}}),
            ("ours streaming (1 latent frame per chunk)", {"impl": "ours", "options": {"mode": "streaming"}}),
            ("ours tiled 2x2, overlap 8", {"impl": "ours", "options": {"mode": "tiled", "tiles": [2, 2]}}),
            (
                "ours tiled 2x2 + streaming",
                {"impl": "ours", "options": {"mode": "tiled", "tiles": [2, 2], "frames_per_chunk": 1}},
            ),
            ("ours auto (default budget)", {"impl": "ours", "options": {"mode": "auto"}}),
            ("diffusers untiled", {"impl": "diffusers", "options": {}}),
            ("diffusers enable_tiling()", {"impl": "diffusers", "options": {"tiling": True}}),
        ]
        results = {name: measure({**base, **c, "latent": latent}) for name, c in cases}
        print("| case | time s | added peak MiB | process peak MiB |")
        print("|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['seconds']:.1f} | {mib(r['added'])} | {mib(r['peak'])} |")
        pairs = [
            ("ours full", "diffusers untiled"),
            ("ours tiled 2x2, overlap 8", "diffusers enable_tiling()"),
            ("ours tiled 2x2 + streaming", "diffusers enable_tiling()"),
            ("ours streaming (1 latent frame per chunk)", "diffusers untiled"),
        ]
        print("\n| ours / diffusers | time | added peak memory |")
        print("|---|---|---|")
        for a, b in pairs:
            ra, rb = results[a], results[b]
            print(f"| {a} / {b} | {ra['seconds'] / rb['seconds']:.2f} | {ra['added'] / rb['added']:.2f} |")


if __name__ == "__main__":
    main()
