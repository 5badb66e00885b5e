"""The demo build is reproducible (issue 15): the same command and seed give byte-identical files, another seed other
weights, and a build stopped in the middle of any stage and run again ends with exactly an uninterrupted build's."""

from __future__ import annotations

from pathlib import Path

import pytest
import toy_build

from mochi_preview.demo import build
from mochi_preview.train import LatentData, Trainer

# Toy clips (16x16 x 13 frames, VAE first stage at 8x8 x 7), 4 steps a stage, a checkpoint every 2; no checks.
TOY = [*toy_build.TOY, "--threads", "1"]
STEPS = ["--text_steps", "4", "--vae_steps", "4", "--vae_finetune_steps", "4", "--dit_steps", "4", "--vae_batch", "2"]
STEPS += ["--decoder_steps", "4"]  # the decoder alone on noisy latents, after the DiT


def build_args(out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), *TOY, *STEPS, "--latent_clips", "16", "--checkpoint_every", "2", "--skip_eval", *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Killed(Exception):
    """Stands for the process dying: nothing after it runs, the next build starts from what is on disk."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("straight") / "demo"
    build.main(build_args(out))
    return files(out)


def test_the_same_command_and_seed_give_byte_identical_files(straight, tmp_path):
    # In the same process as the first build: what ran before must not change the new models' initial weights.
    build.main(build_args(tmp_path / "demo"))
    again = files(tmp_path / "demo")
    assert {"dit.safetensors", "encoder.safetensors", "decoder.safetensors", "t5/model.safetensors"} <= set(again)
    assert again == straight


def test_another_seed_gives_other_weights(straight, tmp_path):
    build.main(build_args(tmp_path / "demo", "--seed", "1"))
    other = files(tmp_path / "demo")
    for name in ["dit.safetensors", "encoder.safetensors", "decoder.safetensors", "t5/model.safetensors"]:
        assert other[name] != straight[name], name


def test_a_build_stopped_in_every_stage_resumes_to_the_same_files(straight, tmp_path, monkeypatch):
    stopped = []

    def once(what: str) -> None:
        if what not in stopped:
            stopped.append(what)
            raise Killed(what)

    train_step = Trainer.train_step

    def stopping_step(self):
        if self.step == 3:  # steps 1-3 done, the last checkpoint at 2: step 3 is lost and done again
            once(f"{type(self).__name__} {self.cfg.steps} {self.cfg.lr}")  # each training stage once
        return train_step(self)

    def partial(what: str, write):
        def stopping_write(*args):
            if what in stopped:
                return write(*args)
            path = Path(args[-1])  # a file cut short by the kill
            path.write_bytes(b"partial")
            once(what)

        return stopping_write

    monkeypatch.setattr(Trainer, "train_step", stopping_step)
    monkeypatch.setattr(LatentData, "save", partial("latent cache", LatentData.save))
    monkeypatch.setattr(build, "save_file", partial("export", build.save_file))
    out = tmp_path / "demo"
    for _ in range(10):
        try:
            build.main(build_args(out))
            break
        except Killed as e:
            if str(e) == "export":  # every exported file is whole or absent
                assert not (out / "decoder.safetensors").exists()
                assert sorted(p.name for p in out.iterdir()) == ["dit.safetensors", "t5"]
    kinds = [s.split()[0] for s in stopped]
    assert kinds == ["TextTrainer", "VAETrainer", "VAETrainer", "latent", "DiTTrainer", "VAETrainer", "export"], stopped
    assert files(out) == straight
