"""Manifests: the shipped demo folder's, `python -m mochi_preview.verify`, and the checks loading calls."""

import contextlib
import io
import json
import shutil
import struct
import subprocess
import sys

import pytest

from mochi_preview import verify
from mochi_preview.tiny import DEMO_MODEL_DIR
from mochi_preview.verify import MANIFEST, CorruptFolderError, check_hashes, check_sizes


def run_verify(*args) -> subprocess.CompletedProcess:
    """`python -m mochi_preview.verify ARGS`, run in this process (a new interpreter spends seconds importing torch)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = verify.main(map(str, args))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def demo(tmp_path):
    """A copy of the demo folder, manifest included."""
    return shutil.copytree(DEMO_MODEL_DIR, tmp_path / "demo")


def flip_byte_of_tensor(path, name: str) -> None:
    """Flip one bit of the first byte of tensor `name`'s data in a safetensors file (its size stays the same)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    data[begin] ^= 0x01
    path.write_bytes(data)


def test_shipped_demo_manifest_lists_every_file_and_matches():
    listed = verify.read_manifest(DEMO_MODEL_DIR)
    assert listed == verify.manifest_of(DEMO_MODEL_DIR)  # every file, each size and hash (rebuilt demo: --write)
    assert {"dit.safetensors", "decoder.safetensors", "t5/model.safetensors"} <= set(listed)
    check_hashes(DEMO_MODEL_DIR)
    cmd = [sys.executable, "-m", "mochi_preview.verify", str(DEMO_MODEL_DIR)]  # once as a real command
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK: all" in result.stdout


def test_one_flipped_byte_in_the_dit_is_named(demo):
    dit = demo / "dit.safetensors"
    size = dit.stat().st_size
    flip_byte_of_tensor(dit, "final_layer.linear.weight")
    assert dit.stat().st_size == size
    check_sizes(demo)  # the size check cannot see it ...
    with pytest.raises(CorruptFolderError, match=r"dit\.safetensors: SHA-256 [0-9a-f]{64} differs"):
        check_hashes(demo)  # ... the hash check does
    result = run_verify(demo)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [line for line in result.stdout.splitlines() if line.startswith("BAD ")]
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["BAD dit.safetensors"]
    assert run_verify(demo, "--sizes").returncode == 0


def test_truncated_and_missing_files_are_each_named(demo):
    size = (demo / "decoder.safetensors").stat().st_size
    with open(demo / "decoder.safetensors", "r+b") as f:
        f.truncate(1000)
    (demo / "t5" / "spiece.model").unlink()
    with pytest.raises(CorruptFolderError) as err:
        check_sizes(demo)
    assert f"decoder.safetensors: 1,000 bytes, expected {size:,}" in str(err.value)
    assert "t5/spiece.model: missing" in str(err.value)
    result = run_verify(demo, "--sizes")
    assert result.returncode == 1
    assert sorted(result.stdout.splitlines()) == [
        f"BAD decoder.safetensors: 1,000 bytes, expected {size:,} (an interrupted or damaged download?)",
        "BAD t5/spiece.model: missing",
    ]


def test_folder_without_manifest_is_not_checked_by_loading_but_is_a_usage_error_for_verify(demo):
    (demo / MANIFEST).unlink()
    check_sizes(demo)
    check_hashes(demo)
    result = run_verify(demo)
    assert result.returncode == 2 and f"has no {MANIFEST}" in result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not a readable manifest"),
        ('{"files": {"dit.safetensors": {"size": 1}}}', "is not a readable manifest"),
        ('{"files": {"../outside": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "is not a path inside the folder"),
        ('{"files": {"dit.safetensors": {"size": 1, "sha256": "abc"}}}', "64-digit lowercase hex sha256"),
    ],
)
def test_bad_manifest_is_a_usage_error_naming_it(demo, text, message):
    (demo / MANIFEST).write_text(text)
    with pytest.raises(verify.ManifestError, match=message):
        check_sizes(demo)
    result = run_verify(demo)
    assert result.returncode == 2 and message in result.stderr and MANIFEST in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run_verify(tmp_path / "nope").returncode == 2
    assert run_verify().returncode == 2


def test_write_makes_a_manifest_of_the_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "sub" / "b.json").write_text("{}")
    (folder / ".partial-x").write_text("skip me")
    assert run_verify(folder, "--write").returncode == 0
    entries = verify.read_manifest(folder)
    assert entries == {
        "a.bin": verify.Entry(3, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        "sub/b.json": verify.Entry(2, "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
    }
    assert run_verify(folder).returncode == 0


def test_loading_checks_weights_but_leaves_settings_files_editable(demo):
    (demo / "mochi_defaults.json").write_text('{"width": 64}')
    check_hashes(demo)  # what loading runs: weights, tokenizer model
    assert run_verify(demo).stdout.startswith("BAD mochi_defaults.json: ")  # the command checks everything
    size = (demo / "t5" / "model.safetensors").stat().st_size
    with open(demo / "t5" / "model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptFolderError, match=rf"t5/model\.safetensors: {size + 1:,} bytes, expected {size:,}"):
        check_sizes(demo)
