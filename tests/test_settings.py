"""The settings table: one vocabulary for the API, the CLI, files and the UI, checked in one place."""

from __future__ import annotations

import argparse
import inspect
import json

import pytest

from mochi_preview import settings as table
from mochi_preview.pipeline import MochiPipeline
from mochi_preview.sampling import linear_quadratic_schedule
from mochi_preview.settings import SEED_MAX, SETTINGS, Settings, model_defaults

BAD = Settings(num_frames=84, width=50, num_inference_steps=0, guidance_scale=100.0, seed=-1)


def test_every_surface_has_one_name_per_setting():
    for surface in table.SURFACES:
        names = [s.name(surface) for s in SETTINGS]
        assert len(set(names)) == len(names), surface
    assert [f for f in inspect.signature(Settings).parameters] == [s.api for s in SETTINGS]
    assert table.name("guidance_scale", "cli") == "--cfg_scale" and table.name("guidance_scale", "file") == "cfg_scale"
    assert table.name("num_inference_steps", "cli") == "--num_steps" and table.name("num_frames", "ui") == "Frames"
    with pytest.raises(ValueError, match="surface must be one of"):
        table.name("seed", "web")


def test_pipeline_kwargs_are_the_pipelines_keywords():
    """The contract with the pipeline: Settings' fields are `MochiPipeline.__call__`'s (diffusers') names."""
    kwargs = Settings().pipeline_kwargs()
    accepted = inspect.signature(MochiPipeline.__call__).parameters
    assert set(kwargs) <= set(accepted), set(kwargs) - set(accepted)
    assert kwargs["guidance_scale"] == 6.0 and kwargs["num_inference_steps"] == 64 and kwargs["seed"] == 1710977262


@pytest.mark.parametrize(
    "surface, names",
    [
        ("api", ["num_frames=84", "width=50", "seed must", "guidance_scale must", "num_inference_steps must"]),
        ("cli", ["--num_frames=84", "--width=50", "--seed must", "--cfg_scale must", "--num_steps must"]),
        ("file", ["num_frames=84", "width=50", "seed must", "cfg_scale must", "num_steps must"]),
        ("ui", ["Frames=84", "Width=50", "Seed must", "CFG scale must", "Steps must"]),
    ],
)
def test_errors_name_settings_as_each_surface_does(surface, names):
    with pytest.raises(ValueError) as e:
        BAD.check(surface)
    message = str(e.value)
    assert message == "; ".join(BAD.problems(surface))
    assert [p.split(" ")[0] for p in BAD.problems(surface)] == [n.split(" ")[0] for n in names]
    assert all(n in message for n in names)
    assert "nearest valid: [79, 85]" in message and "nearest valid: [48, 64]" in message


def test_seeds_cover_64_bits_and_integers_refuse_fractions():
    for seed in (0, 2**32, SEED_MAX, None):  # None: the pipeline draws one
        assert Settings(seed=seed).check().seed == seed
    for seed, problem in ((-1, "between 0 and 2**64 - 1"), (2**64, "between 0 and 2**64 - 1"), (1.5, "whole")):
        with pytest.raises(ValueError, match=rf"seed must be .*{problem[:7]}"):
            Settings(seed=seed).check()
    for field in ("width", "height", "num_frames", "num_inference_steps", "linear_steps"):
        with pytest.raises(ValueError, match=f"^{field} must be a whole number; got 16.5$"):
            Settings(**{field: 16.5}).check()
    with pytest.raises(ValueError, match="num_frames must be a whole number; got True"):
        Settings(num_frames=True).check()
    with pytest.raises(ValueError, match="guidance_scale must be a finite number; got nan"):
        Settings(guidance_scale=float("nan")).check()
    with pytest.raises(ValueError, match="^prompt must be text; got 5$"):
        Settings(prompt=5).check()
    with pytest.raises(ValueError, match="^negative_prompt is missing$"):
        Settings(negative_prompt=None).check()


def test_schedule_and_per_step_guidance():
    s = Settings(num_inference_steps=8, threshold_noise=0.1, linear_steps=3)
    assert s.sigmas == linear_quadratic_schedule(8, 0.1, 3)
    assert Settings(num_inference_steps=3, guidance_scale=[4.0, 5.0, 6.0], prompt=["a", "b"]).check()
    with pytest.raises(ValueError, match="guidance_scale has 2 values but num_inference_steps is 3"):
        Settings(num_inference_steps=3, guidance_scale=[4.0, 5.0]).check()
    with pytest.raises(ValueError, match=r"--linear-steps must be in \[1, 7\] for 8 steps"):
        Settings(num_inference_steps=8, linear_steps=8).check("cli")


def test_file_names_round_trip_and_old_digests_stay():
    """Sweep lines and sidecars use the CLI's names; a sweep's file names (its digests) are those of before."""
    s = Settings().updated({"cfg_scale": 4.5, "num_steps": 24, "width": 64.0, "threshold_noise": 0.05})
    assert (s.guidance_scale, s.num_inference_steps, s.width, s.threshold_noise) == (4.5, 24, 64, 0.05)
    assert isinstance(s.width, int) and Settings().updated(s.to_file()) == s
    assert list(Settings().to_file())[:7] == ["prompt", "negative_prompt", "width", "height", "num_frames", "seed",
                                               "cfg_scale"]  # fmt: skip
    # the digest the CLI gave this sweep line before the table existed (resume must keep skipping finished lines)
    assert Settings(width=64, guidance_scale=4.5).digest() == "10640fbda0"
    with pytest.raises(ValueError, match=r"^x.jsonl:3: unknown keys \['guidance_scale'\]; valid: \["):
        Settings().updated({"guidance_scale": 3.0}, where="x.jsonl:3")
    with pytest.raises(ValueError, match="num_steps must be a whole number; got '24'"):
        Settings().updated({"num_steps": "24"})


def test_ui_values_are_read_without_rounding():
    ui = Settings().updated({"width": 64.0, "seed": None, "linear_steps": "", "prompt": None}, "ui")
    assert (ui.width, ui.seed, ui.linear_steps, ui.prompt) == (64, None, None, "")
    with pytest.raises(ValueError, match="^Width is empty; enter a number$"):
        Settings().updated({"width": None}, "ui")
    with pytest.raises(ValueError, match="^Frames must be a whole number; got 13.5$"):
        Settings().updated({"num_frames": 13.5}, "ui")


def test_model_folder_defaults(tmp_path):
    assert model_defaults(tmp_path) == Settings() and model_defaults(None) == Settings()
    path = tmp_path / "mochi_defaults.json"
    path.write_text(json.dumps({"width": 64, "height": 64, "num_frames": 25, "num_steps": 24, "cfg_scale": 4.5}))
    d = model_defaults(tmp_path)
    assert (d.width, d.height, d.num_frames, d.num_inference_steps, d.guidance_scale) == (64, 64, 25, 24, 4.5)
    assert d.seed == 1710977262 and d.prompt == table.DEFAULT_PROMPT
    for content, message in (
        ({"width": 64, "cfg": 4.5}, r"unknown keys \['cfg'\]"),
        ({"width": "64"}, "width must be a whole number; got '64'"),
        ({"num_frames": 24}, r"num_frames=24 is not of the form 6k\+1"),
        ([64], "expected a JSON object"),
    ):
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"^{path}: {message}"):
            model_defaults(tmp_path)
    path.write_text("{width: 64}")
    with pytest.raises(ValueError, match=f"^{path}: not valid JSON"):
        model_defaults(tmp_path)


def test_cli_flags_come_from_the_table():
    parser = argparse.ArgumentParser()
    table.add_arguments(parser)
    flags = {f for a in parser._actions for f in a.option_strings} - {"-h", "--help"}
    assert flags == {f for s in SETTINGS for f in s.cli_flags}
    assert {"--cfg_scale", "--num_steps", "--threshold-noise", "--threshold_noise", "--linear-steps"} <= flags
    args = parser.parse_args(["--cfg_scale", "4.5", "--num_steps", "24", "--threshold-noise", "0.1"])
    s = table.from_arguments(args, Settings(width=64))
    assert (s.guidance_scale, s.num_inference_steps, s.threshold_noise, s.width) == (4.5, 24, 0.1, 64)
    assert table.from_arguments(parser.parse_args(["--linear_steps", "5"]), Settings()).linear_steps == 5


def test_noise_is_a_setting_and_old_digests_stay():
    """--noise cpu|genmo: a row like any other (flag, file key, sidecar); at its default it leaves a sweep line's
    digest as before the row existed, so resumed sweeps skip their finished lines."""
    assert Settings().noise == "cpu" and Settings().pipeline_kwargs()["noise"] == "cpu"
    assert Settings().updated({"noise": "genmo"}).to_file()["noise"] == "genmo"
    assert Settings(width=64, guidance_scale=4.5).digest() == "10640fbda0"  # as in test_file_names_round_trip
    assert Settings(width=64, guidance_scale=4.5, noise="genmo").digest() != "10640fbda0"
    with pytest.raises(ValueError, match="^--noise must be one of cpu, genmo; got 'gpu'$"):
        Settings(noise="gpu").check("cli")
    parser = argparse.ArgumentParser()
    table.add_arguments(parser)
    assert parser.parse_args(["--noise", "genmo"]).noise == "genmo"


def test_pixel_input_rows_check_their_ranges_and_conflicts_and_keep_old_digests():
    """--image / --init_video / --extend with --strength, --image_mode, --image_release, --noise_multiplier: rows
    like the others, checked before loading; at their defaults a sweep line's digest is as before them."""
    assert Settings(width=64, guidance_scale=4.5).digest() == "10640fbda0"
    assert Settings(width=64, guidance_scale=4.5, image="a.png").digest() != "10640fbda0"
    parser = argparse.ArgumentParser()
    table.add_arguments(parser)
    args = parser.parse_args(["--init_video", "in.mp4", "--strength", "0.4", "--image_mode", "guide"])
    s = table.from_arguments(args, Settings())
    assert (s.video, s.strength, s.image_mode) == ("in.mp4", 0.4, "guide")
    assert s.pipeline_kwargs()["video"] == "in.mp4" and s.to_file()["init_video"] == "in.mp4"
    Settings(strength=1.0, image_release=0.0).check()
    for bad, match in [
        (dict(strength=0.0), r"^--strength must be in \(0, 1\]; got 0.0$"),
        (dict(strength=1.2), r"^--strength must be in \(0, 1\]"),
        (dict(image_release=1.0), r"^--image_release must be in \[0, 1\); got 1.0$"),
        (dict(noise_multiplier=-0.1), r"^--noise_multiplier must be between 0 and 1"),
        (dict(image="a.png", video="b.mp4"), r"^--image and --init_video were both given"),
        (dict(image_mode="soft"), r"^--image_mode must be one of replace, guide"),
    ]:
        with pytest.raises(ValueError, match=match):
            Settings(**bad).check("cli")
    assert Settings().updated({"image": ""}, "ui").image is None  # an empty file field: no image


def test_cli_help_shows_the_models_defaults():
    parser = argparse.ArgumentParser()
    table.add_arguments(parser, Settings(width=64, prompt="a red ball", guidance_scale=4.5))
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["width"].endswith("(default: 64)") and helps["cfg_scale"].endswith("(default: 4.5)")
    assert helps["prompt"].endswith("(default: 'a red ball')")
    assert helps["num_frames"].endswith("(default: 163)")  # not the model's: the table's
    assert table.BY_API["prompt"].cli_help().endswith("(default: the model card's lemon prompt)")


@pytest.mark.parametrize("flag, text", [("--width", "16.5"), ("--num_steps", "2.5"), ("--seed", "1e3")])
def test_cli_integers_refuse_fractions(flag, text, capsys):
    parser = argparse.ArgumentParser()
    table.add_arguments(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([flag, text])
    assert stop.value.code == 2 and f"argument {flag}: must be a whole number; got '{text}'" in capsys.readouterr().err
