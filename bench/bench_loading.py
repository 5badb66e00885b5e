"""Weight loading: peak RSS and time of loading a fp32 DiT checkpoint as bf16, ours next to diffusers.

The checkpoint is a reduced *full-width* model (2 blocks of the published width, ~1.7 GB in fp32), written once in
both layouts. Each loader runs in a fresh subprocess that reports its own peak RSS; the baseline is the same
interpreter after imports. Target (issue 2): ours <= baseline + 1.25 x the bf16 model size.

    python bench/bench_loading.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
which, path = sys.argv[1], sys.argv[2]
import mochi_preview
from diffusers import MochiTransformer3DModel  # imported by every child, the baseline too
t0 = time.perf_counter()
if which == "ours":
    model = mochi_preview.load_dit(path, dtype=torch.bfloat16)
elif which == "diffusers":
    model = MochiTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)
if which != "baseline":
    params = sum(p.numel() * p.element_size() for p in model.parameters())
else:
    params = 0
seconds = time.perf_counter() - t0
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across fork/exec).
status = open("/proc/self/status").read().split("VmHWM:")[1]
rss = int(status.split()[0]) * 1024
print(json.dumps({"which": which, "seconds": seconds, "peak_rss": rss, "model_bytes": params}))
"""


def make_checkpoints(root: Path) -> tuple[Path, Path]:
    """A 2-block full-width diffusers folder (random fp32) and the native file converted from it."""
    import torch
    from diffusers import MochiTransformer3DModel

    from mochi_preview.dit import save_dit_native

    folder, native = root / "transformer", root / "dit.safetensors"
    if not folder.exists():
        torch.manual_seed(0)
        model = MochiTransformer3DModel(num_layers=2)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="10GB")
        del model
    if not native.exists():
        save_dit_native(native, folder)
    return folder, native


def run(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: tmp)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mochi_bench_loading_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder, native = make_checkpoints(root)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s: {native.stat().st_size / 2**30:.2f} GiB fp32")

    base = run("baseline", native)
    rows = [
        ("ours, native dit.safetensors", run("ours", native)),
        ("ours, diffusers transformer/", run("ours", folder)),
        ("diffusers from_pretrained", run("diffusers", folder)),
    ]
    model_bytes = rows[0][1]["model_bytes"]
    print(f"\nbf16 model size: {model_bytes / 2**30:.2f} GiB; interpreter baseline: {base['peak_rss'] / 2**30:.2f} GiB")
    print(f"{'loader':32s} {'time s':>8s} {'peak RSS GiB':>13s} {'(RSS-base)/bf16':>16s} {'time / diffusers':>17s}")
    ref_time = rows[-1][1]["seconds"]
    for name, r in rows:
        ratio = (r["peak_rss"] - base["peak_rss"]) / model_bytes
        rss, speed = r["peak_rss"] / 2**30, r["seconds"] / ref_time
        print(f"{name:32s} {r['seconds']:8.2f} {rss:13.2f} {ratio:16.2f} {speed:17.2f}")


if __name__ == "__main__":
    main()
