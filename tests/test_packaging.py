"""Packaging as the ecosystem expects (issue 21, point 7): a wheel built from a fresh clone, without
scripts/setup.sh and offline, carries the license, the demo model and the `mochi` script, and the package installed
from it generates "pil" frames with the demo model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GENERATE = """
import sys
import mochi_preview
from mochi_preview import MochiPipeline
from mochi_preview.tiny import DEMO_MODEL_DIR
assert mochi_preview.__file__.startswith(sys.argv[1]), mochi_preview.__file__
pipe = MochiPipeline.from_pretrained(DEMO_MODEL_DIR, device="cpu")
frames = pipe("a red ball", seed=1, num_inference_steps=1, output_type="pil", progress=False).frames[0]
print(len(frames), frames[0].size)
"""


def test_wheel_from_a_fresh_clone_ships_license_demo_model_and_script_and_generates_pil(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    build = [sys.executable, "-m", "pip", "wheel", str(clone), "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "--quiet", "--wheel-dir", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("mochi_preview-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        scripts = z.read(f"{info}/entry_points.txt").decode()
    assert f"{info}/licenses/LICENSE" in names and "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: Pillow" in metadata and "mochi = mochi_preview.infer:main" in scripts
    tracked = subprocess.run(["git", "ls-files", "src/mochi_preview/assets"], cwd=clone, capture_output=True, text=True)
    assets = {f.removeprefix("src/") for f in tracked.stdout.split()}
    assert assets and assets <= names
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True)
    # the installed copy first on the path, the test environment's dependencies after it
    run = subprocess.run([sys.executable, "-c", GENERATE, str(site)], env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == "25" and "(64, 64)" in run.stdout
