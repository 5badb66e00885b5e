"""The web UI server's memory over many sequential jobs (issue 20: it must stay flat, within 10%).

    .venv/bin/python bench/bench_ui_memory.py [--jobs 200] [--model_dir DIR]

Starts `python -m mochi_preview.gradio_ui` on a tiny random model (or DIR), sends the jobs one after another through
gradio_client (Genmo's endpoint, a new seed each), and reads the server's resident memory (VmRSS) after each; prints
the figures every 20 jobs and the spread after the warm-up (the first 10 jobs) against the warm value.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SIZE = dict(width=48, height=32, num_frames=13, num_steps=3)
WARM_UP = 10


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--model_dir", type=Path)
    args = p.parse_args()
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model_dir
        if model is None:
            from mochi_preview.tiny import save_random_model

            model = save_random_model(tmp / "model")
            (model / "mochi_defaults.json").write_text(json.dumps(SIZE))
        port = free_port()
        cmd = [sys.executable, "-m", "mochi_preview.gradio_ui", "--model_dir", str(model), "--quiet"]
        cmd += ["--port", str(port), "--out_dir", str(tmp / "out"), "--dtype", "fp32"]
        env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "NO_PROXY": "127.0.0.1"}
        with open(tmp / "server.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(300):
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.5)
            client = Client(url, verbose=False)
            sizes, start = [], time.monotonic()
            for i in range(args.jobs):
                client.predict("a red ball", "", SIZE["width"], SIZE["height"], SIZE["num_frames"], i, 4.5,
                               SIZE["num_steps"], api_name="/generate_video")  # fmt: skip
                sizes.append(rss(proc.pid))
                if (i + 1) % 20 == 0 or i + 1 == WARM_UP:
                    print(f"job {i + 1:4d}: server RSS {sizes[-1] / 2**20:7.1f} MiB ({time.monotonic() - start:.0f} s)")
            warm = sizes[WARM_UP - 1]
            low, high = min(sizes[WARM_UP - 1 :]), max(sizes[WARM_UP - 1 :])
            print(f"after job {WARM_UP}: {warm / 2**20:.1f} MiB; then {low / 2**20:.1f} .. {high / 2**20:.1f} MiB "
                  f"({(low - warm) / warm:+.1%} .. {(high - warm) / warm:+.1%}); at the end {sizes[-1] / 2**20:.1f} "
                  f"MiB ({(sizes[-1] - warm) / warm:+.1%})")  # fmt: skip
            return 0 if high <= 1.1 * warm and low >= 0.9 * warm else 1
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
