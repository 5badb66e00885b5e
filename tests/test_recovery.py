"""Nothing is lost when something goes wrong: generators on any device (refused early when on the wrong one), a VAE
decode that runs out of memory (a retry with a smaller plan, then the latents written to a file that --decode_latents
turns into the same video), and memory released after a failed job (the web UI's test of it is in test_gradio_ui).

There is no GPU here: CUDA generators are stand-ins that report a CUDA device, and running out of memory is a
`torch.OutOfMemoryError` raised by a patched decode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mochi_preview import pipeline
from mochi_preview.infer import main
from mochi_preview.latents_file import load_latents, save_latents
from mochi_preview.pipeline import DecodeMemoryError, initial_latents, release_memory
from mochi_preview.sampling import get_noise
from mochi_preview.vae.decode import describe_vae_options, next_tiles, smaller_vae_options
from mochi_preview.video import read_video

SMALL = dict(height=32, width=48, num_frames=13, num_inference_steps=3, progress=False)
CLI_SMALL = ["--width", "48", "--height", "32", "--num_frames", "13", "--num_steps", "3", "--dtype", "fp32", "--quiet"]


@pytest.fixture
def full_decode(pipe):
    """The pipeline in vae mode "full" for one test (the retry plan is then "streaming, 1 frame per chunk")."""
    before = pipe.vae_options
    pipe.disable_vae_tiling()
    yield pipe
    pipe.vae_options = before
    pipe.last_decode_options = None


class CudaGenerator:
    """Stands in for torch.Generator("cuda"): what the pipeline reads of a generator is its device."""

    def __init__(self, index: int = 0):
        self.device = torch.device("cuda", index)


def fake_cuda_randn(monkeypatch, calls: list):
    """torch.randn that records the device a draw was asked for and returns CPU zeros (there is no CUDA here)."""
    real = torch.randn

    def randn(*shape, generator=None, device=None, dtype=None, **kw):
        if isinstance(generator, CudaGenerator):
            calls.append(torch.device(device))
            return torch.zeros(*shape, dtype=dtype)
        return real(*shape, generator=generator, device=device, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "randn", randn)


def oom_decode(monkeypatch, failures: int) -> list[dict]:
    """vae.decode raises torch.OutOfMemoryError on its first `failures` calls; returns the options of every call."""
    real, calls = pipeline.vae_decode, []

    def decode(decoder, z, **options):
        calls.append({k: v for k, v in options.items() if k != "group"})
        if len(calls) <= failures:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, call {len(calls)})")
        return real(decoder, z, **options)

    monkeypatch.setattr(pipeline, "vae_decode", decode)
    return calls


# ---- generators on any device ----------------------------------------------------------------------------------


def test_cpu_noise_is_unchanged():
    """The default draw: a CPU generator seeded with the seed, exactly as before (and as diffusers)."""
    expected = torch.randn(1, 12, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(get_noise(1, 13, 32, 48, seed=4), expected)
    g = torch.Generator().manual_seed(4)
    assert torch.equal(get_noise(1, 13, 32, 48, generator=g), expected)


def test_a_cuda_generator_draws_on_its_device(monkeypatch):
    calls = []
    fake_cuda_randn(monkeypatch, calls)
    get_noise(1, 13, 32, 48, generator=CudaGenerator())
    assert calls == [torch.device("cuda", 0)]  # the draw happens on the generator's device, not on the CPU
    noise, seed, device = initial_latents(1, 13, 32, 48, generator=CudaGenerator(), device="cuda")
    assert (seed, device) == (None, "cpu")  # (the stand-in's zeros live on the CPU; a real draw says cuda:0)
    noise, seed, device = initial_latents(1, 13, 32, 48, seed=3, device="cuda")
    assert (seed, device) == (3, "cpu")
    assert initial_latents(1, 13, 32, 48, latents=noise, device="cuda")[1:] == (None, None)
    # a CPU generator is always fine, whatever the pipeline's device
    assert initial_latents(1, 13, 32, 48, generator=torch.Generator(), device="cuda:1")[2] == "cpu"


def test_a_generator_on_another_device_is_refused_before_any_work(pipe, monkeypatch):
    ran = []
    monkeypatch.setattr(pipe.t5, "encode", lambda *a, **k: ran.append("t5"))
    monkeypatch.setattr(pipe.dit, "forward", lambda *a, **k: ran.append("dit"))
    with pytest.raises(ValueError, match=r"the generator is on cuda:0 but the pipeline runs on cpu: pass a generator"):
        pipe("a cat", generator=CudaGenerator(0), **SMALL)
    assert not ran  # nothing ran: not T5, not the DiT
    with pytest.raises(ValueError, match="the generator is on cuda:1 but the pipeline runs on cuda:0"):
        initial_latents(1, 13, 32, 48, generator=CudaGenerator(1), device="cuda:0")


def test_outputs_and_sidecars_say_which_device_drew_the_noise(pipe, native_dir, tmp_path):
    assert pipe("a cat", seed=1, output_type="latent", **SMALL).noise_device == "cpu"
    z = get_noise(1, 13, 32, 48, seed=1)
    assert pipe("a cat", latents=z, output_type="latent", **SMALL).noise_device is None
    out = tmp_path / "a.mp4"
    assert main(["--prompt", "x", "--seed", "2", "--model_dir", str(native_dir), "--output", str(out), *CLI_SMALL]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["noise_device"] == "cpu"


# ---- decode out of memory: one retry with a smaller plan --------------------------------------------------------


def test_smaller_plans(pipe):
    shape = (1, 12, 3, 40, 64)
    assert smaller_vae_options({"mode": "full"}, pipe.decoder, shape) == {"mode": "streaming", "frames_per_chunk": 1}
    streaming = smaller_vae_options({"mode": "streaming", "frames_per_chunk": 2}, pipe.decoder, shape)
    assert streaming == {"mode": "tiled", "tiles": (2, 2), "overlap": 8, "frames_per_chunk": 1}
    tiled = smaller_vae_options({"mode": "tiled", "tiles": (1, 2), "overlap": 4}, pipe.decoder, shape)
    assert tiled == {"mode": "tiled", "tiles": (2, 4), "overlap": 4, "frames_per_chunk": 1}
    auto = smaller_vae_options({"mode": "auto", "memory_budget": 2**40}, pipe.decoder, shape)
    assert auto["mode"] == "auto" and auto["memory_budget"] < 2**30  # half of what the plan needs, not of 1 TiB
    tiny_budget = smaller_vae_options({"mode": "auto", "memory_budget": 1}, pipe.decoder, shape)
    assert tiny_budget["mode"] == "tiled" and tiny_budget["frames_per_chunk"] == 1  # no plan fits: try tiles anyway
    assert next_tiles((1, 1), 4, 6, 8) == (1, 1)  # too small to tile: the same grid (streaming one frame a chunk)
    assert next_tiles((2, 2), 64, 30, 8) == (4, 2)  # the width has no room for 3 or 4 tiles
    assert describe_vae_options(streaming) == "tiled 2x2, 1 latent frame per chunk"


def test_decode_out_of_memory_retries_once_with_a_smaller_plan(full_decode, monkeypatch):
    pipe = full_decode
    z = pipe("a cat", seed=5, output_type="latent", **SMALL).frames
    expected = pipe.decode(z)
    calls = oom_decode(monkeypatch, failures=1)
    with pytest.warns(
        RuntimeWarning, match=r"out of memory decoding the video \(full: CUDA out of memory.*trying once"
    ):
        frames = pipe.decode(z)
    assert calls == [{"mode": "full"}, {"mode": "streaming", "frames_per_chunk": 1}]
    assert pipe.last_decode_options == {"mode": "streaming", "frames_per_chunk": 1}
    np.testing.assert_allclose(frames, expected, atol=1e-5, rtol=0)  # streaming is the full decode, to rounding


def test_decode_out_of_memory_twice_keeps_the_latents(full_decode, monkeypatch):
    pipe = full_decode
    z = pipe("a cat", seed=5, output_type="latent", **SMALL).frames
    calls = oom_decode(monkeypatch, failures=2)
    with pytest.raises(DecodeMemoryError, match=r"with full: .*; then with a smaller plan, streaming, 1 latent") as e:
        with pytest.warns(RuntimeWarning):
            pipe("a cat", seed=5, **SMALL)
    assert len(calls) == 2
    assert torch.equal(e.value.latents, z) and e.value.latents.device.type == "cpu"
    assert e.value.attempts == [{"mode": "full"}, {"mode": "streaming", "frames_per_chunk": 1}]
    assert "DecodeMemoryError.latents" in str(e.value)


def test_cli_writes_the_latents_and_decode_latents_makes_the_same_video(native_dir, tmp_path, monkeypatch, capsys):
    run = ["--prompt", "a red ball", "--seed", "7", "--model_dir", str(native_dir), "--vae_tiling", "off", *CLI_SMALL]
    whole = tmp_path / "whole.mp4"
    assert main([*run, "--output", str(whole)]) == 0

    calls = oom_decode(monkeypatch, failures=2)
    broken = tmp_path / "broken.mp4"
    with pytest.warns(RuntimeWarning):
        assert main([*run, "--output", str(broken)]) == 2
    assert len(calls) == 2 and not broken.exists()
    latents_file = tmp_path / "broken.latents.safetensors"
    command = f"python -m mochi_preview.infer --decode_latents {latents_file} --model_dir {native_dir}"
    err = capsys.readouterr().err
    assert f"The finished latents are kept in {latents_file}; decode them with:\n  {command}\n" in err
    latents, meta = load_latents(latents_file)
    assert latents.shape == (1, 12, 3, 4, 6) and meta["settings"]["seed"] == 7
    assert meta["model_dir"] == str(native_dir) and meta["decode"]["dtype"] == "float32"
    assert len(meta["latent_stats"]["mean"]) == 12 and meta["decode"]["vae"] == {"mode": "full"}

    monkeypatch.undo()  # memory is back
    decoded = tmp_path / "decoded.mp4"
    assert main([*command.split()[3:], "--vae_tiling", "off", "--output", str(decoded), "--quiet"]) == 0
    assert np.array_equal(read_video(decoded)[0], read_video(whole)[0])  # the same video, bit for bit
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (whole, decoded))
    assert list(b) == [*a, "decoded_from", "decode_device"]  # a sidecar like a normal run's, and where it came from
    same = ("prompt", "seed", "sigmas", "cfg_schedule", "dtype", "model_dir", "model_files", "noise_device", "vae")
    assert {k: b[k] for k in same} == {k: a[k] for k in same}
    assert b["decoded_from"] == str(latents_file) and set(b["seconds"]) == {"vae"}
    from mochi_preview import decode

    again = tmp_path / "again.mp4"  # python -m mochi_preview.decode: the same, with the file first
    assert decode.main([str(latents_file), "--vae_tiling", "on", "--output", str(again), "--quiet"]) == 0
    assert json.loads(again.with_suffix(".json").read_text())["vae"]["mode"] == "tiled"
    assert np.abs(read_video(again)[0].astype(int) - read_video(whole)[0].astype(int)).max() <= 2  # tiles blend
    assert decode.main(["--output", str(again)]) == 2 and "the latents file comes first" in capsys.readouterr().err


def test_save_latents_writes_the_file_and_the_video(native_dir, tmp_path, pipe):
    path = tmp_path / "run.latents.safetensors"
    out = tmp_path / "run.mp4"
    args = ["--prompt", "a cat", "--seed", "3", "--model_dir", str(native_dir), "--save_latents", str(path)]
    assert main([*args, "--output", str(out), *CLI_SMALL]) == 0
    assert out.is_file()
    latents, meta = load_latents(path)
    expected = pipe("a cat", seed=3, guidance_scale=6.0, output_type="latent", **SMALL).frames  # the CLI's CFG
    torch.testing.assert_close(latents, expected)
    assert meta["record"]["seed"] == 3 and meta["record"]["noise_device"] == "cpu"
    assert main([*args, "--output", str(tmp_path / "again.mp4"), *CLI_SMALL]) == 2  # the latents file exists
    assert not (tmp_path / "again.mp4").exists()


def test_bad_latents_files_are_clear_errors(tmp_path, capsys):
    not_latents = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(not_latents))
    assert main(["--decode_latents", str(not_latents)]) == 2
    assert "is not a Mochi latents file" in capsys.readouterr().err
    assert main(["--decode_latents", str(tmp_path / "missing.safetensors")]) == 2
    assert "latents file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lacks"):
        save_latents(tmp_path / "y.safetensors", torch.zeros(1, 12, 1, 2, 2), {"settings": {}})


# ---- after a job out of memory --------------------------------------------------------------------------------


def test_release_memory_empties_the_cuda_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    release_memory("cpu")
    assert not emptied
    release_memory(torch.device("cuda", 0))
    assert emptied == [1]


def test_latents_decoded_later_are_the_video(pipe):
    """output_type="latent" now, pipe.decode_latents later: the frames a whole run makes."""
    latents = pipe("a cat", seed=5, output_type="latent", **SMALL).frames
    whole = pipe("a cat", seed=5, output_type="np", **SMALL).frames
    np.testing.assert_array_equal(pipe.decode_latents(latents), whole)
