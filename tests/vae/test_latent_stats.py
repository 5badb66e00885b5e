"""A model folder's latent_stats.json: read when valid, named file and key when not (before any weights load)."""

import json

import pytest

from mochi_preview.vae import LATENTS_MEAN, load_latent_stats


def test_a_folder_without_stats_uses_the_published_ones(tmp_path):
    assert load_latent_stats(tmp_path) is None


def test_valid_stats_are_read(tmp_path):
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.5] * 12, "std": [2] * 12}))
    assert load_latent_stats(tmp_path) == ([0.5] * 12, [2.0] * 12)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"mean": list(LATENTS_MEAN)}, "missing key 'std'"),
        ([1, 2], "expected an object"),
        ({"mean": "x", "std": [1] * 12}, "must be lists of numbers"),
        ({"mean": [0] * 12, "std": [1] * 11}, "got 12 means and 11 stds"),
        ({"mean": [0] * 12, "std": [0] * 12}, "positive"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_stats_name_the_file_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "latent_stats.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as e:
        load_latent_stats(tmp_path)
    assert str(path) in str(e.value)


def test_a_diffusers_folder_brings_its_stats_in_its_vae_config(tmp_path):
    """A diffusers folder fine-tuned elsewhere keeps its own constants in vae/config.json; latent_stats.json wins."""
    (tmp_path / "vae").mkdir()
    config = {"_class_name": "AutoencoderKLMochi", "latents_mean": [0.25] * 12, "latents_std": [3.0] * 12}
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    assert load_latent_stats(tmp_path) == ([0.25] * 12, [3.0] * 12)
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "latents_std": [0.0] * 12}))
    with pytest.raises(ValueError, match="vae/config.json"):
        load_latent_stats(tmp_path)
    (tmp_path / "latent_stats.json").write_text(json.dumps({"mean": [0.5] * 12, "std": [2.0] * 12}))
    assert load_latent_stats(tmp_path) == ([0.5] * 12, [2.0] * 12)


def test_a_vae_config_without_stats_means_the_published_ones(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    assert load_latent_stats(tmp_path) is None
