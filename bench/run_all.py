"""Every benchmark, one after the other, ours next to diffusers in each: `python bench/run_all.py [--quick]`.

Each script runs in its own process (the VAE one spawns a fresh process per case, for clean peak-memory readings);
their outputs are printed and collected, with the machine and date, in bench/LATEST.md. bench/RESULTS.md holds the
curated figures with their reading. About 45 minutes on 2 CPU cores (`--quick`: without the long-sequence DiT case
and with fewer repeats, about 20).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    import torch

    versions = f"Python {platform.python_version()}, torch {torch.__version__}"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores; {versions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = [
        ("DiT forward", ["bench_dit.py", "--repeats", "3" if args.quick else "5", *([] if args.quick else ["--long"])]),
        ("VAE decode", ["bench_vae.py"]),
        ("Weight loading", ["bench_loading.py"]),
        ("FP8 weights", ["bench_fp8.py", "--repeats", "1" if args.quick else "3"]),
        ("Whole pipeline on the demo model", ["bench_pipeline.py", "--repeats", "1" if args.quick else "3"]),
        ("One H100, estimated", ["estimate_h100.py", "--no-write"]),
    ]
    parts = [f"# Benchmarks, {time.strftime('%Y-%m-%d %H:%M')}\n\n{machine()}\n"]
    for title, (script, *options) in runs:
        print(f"\n## {title}: python bench/{script} {' '.join(options)}", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, str(HERE / script), *options], capture_output=True, text=True)
        out = proc.stdout + (f"\n(exit {proc.returncode})\n{proc.stderr[-2000:]}" if proc.returncode else "")
        print(out, flush=True)
        command = f"python bench/{script} {' '.join(options)}"
        parts.append(f"## {title}\n\n`{command}` ({time.time() - start:.0f} s)\n\n{out}")
    (HERE / "LATEST.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
