"""The training loop shared by the DiT and VAE trainers.

AdamW with linear warm-up then cosine decay, gradient clipping, EMA weights, one seeded torch.Generator (plus one
numpy Generator for data made on the fly) and checkpoints that resume exactly: tensors in safetensors, everything
else in JSON (no pickle). Training N steps straight or N/2, save, load into a fresh trainer, N/2 more gives the same
weights bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..files import write_atomic

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings common to every trainer."""

    steps: int = 2000
    lr: float = 6e-4
    warmup: int = 100
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # 0: no EMA (no shadow copy of the weights)
    seed: int = 0
    threads: int = 2  # torch.set_num_threads; 0 leaves torch's choice alone
    checkpoint_every: int = 500  # steps between checkpoints when fit() is given a path


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch's global RNGs (the trainers themselves draw from their own generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to cfg.lr over cfg.warmup updates, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup  # the first update already moves (the reference starts at 0)
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on tensors of 2+ dims (matrices, conv kernels, the DiT's (3, heads, pairs) RoPE
    frequencies), not on biases and norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # foreach=False: the plain per-tensor loop, the same arithmetic whatever the number of tensors.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


class EMA:
    """Shadow weights: ema <- d * ema + (1 - d) * w after every update, with d = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        # Early on the average follows the model closely: a freshly initialised model is not worth remembering.
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        for k, v in self.shadow.items():
            v.lerp_(state[k].detach(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into `model` (e.g. a copy used for sampling); returns it."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)
        return model


class Trainer:
    """One model, its optimizer, EMA and RNGs; subclasses define `loss()` -> (loss tensor, dict of floats to log)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model, self.cfg = model.train(), cfg
        self.optimizer = make_optimizer(model, cfg)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(cfg.seed)  # noise, sigmas, batch indices, dropout
        self.rng = np.random.default_rng(cfg.seed)  # data generated on the fly
        self.step = 0
        self.history: list[dict] = []  # one dict of logged floats per step

    def loss(self) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights (the weights as trained without EMA), in eval mode."""
        model = copy.deepcopy(self.model)
        return (self.ema.copy_to(model) if self.ema is not None else model).eval()

    def train_step(self) -> dict:
        """One update: loss, backward, clip, AdamW at the scheduled lr, EMA."""
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, logs = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        logs = {"step": self.step, "loss": loss.item(), "lr": lr, **logs}
        self.history.append(logs)
        return logs

    def fit(
        self,
        until: int | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = True,
        after_step: Callable[[dict], object] | None = None,
    ) -> list:
        """Train up to step `until` (default cfg.steps), saving to `checkpoint` every cfg.checkpoint_every steps
        and at the end; resumes from `checkpoint` first if it exists. `after_step(logs)` runs after each update,
        before that step's checkpoint (validation, exports). Returns the per-step logs. The bar shows the smoothed
        loss, steps/s and the time left."""
        until = self.cfg.steps if until is None else until
        if checkpoint is not None and Path(checkpoint, "state.json").exists():
            self.load(checkpoint)
        bar = tqdm(total=until, initial=self.step, disable=not progress, dynamic_ncols=True, unit="step")
        smooth = None
        while self.step < until:
            logs = self.train_step()
            smooth = logs["loss"] if smooth is None else 0.95 * smooth + 0.05 * logs["loss"]
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{logs['lr']:.2e}", refresh=False)
            bar.update(1)
            if after_step is not None:
                after_step(logs)
            if checkpoint is not None and (self.step % self.cfg.checkpoint_every == 0 or self.step == until):
                self.save(checkpoint)
        bar.close()
        return self.history

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _frozen(self) -> set[str]:
        """State-dict names of the frozen parameters: constant, so not checkpointed (a LoRA's base DiT)."""
        return {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to resume: (tensors, JSON-serialisable metadata)."""
        frozen = self._frozen()
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items() if k not in frozen}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        optim = self.optimizer.state_dict()
        for i, s in optim["state"].items():
            tensors |= {f"optim.{i}.{name}": torch.as_tensor(v) for name, v in s.items()}
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "config": asdict(self.cfg),
            "param_groups": optim["param_groups"],
            "optim_state_keys": {str(i): list(s) for i, s in optim["state"].items()},
            "numpy_rng": self.rng.bit_generator.state,
            "history": self.history,
        }
        return tensors, json.loads(json.dumps(meta))  # as it will read back (tuples become lists)

    def save(self, path: str | Path) -> None:
        """Write path/state.safetensors, which holds everything (the metadata too, so that one atomic file is one
        consistent checkpoint: a kill between two writes cannot pair new tensors with old metadata), then
        path/state.json, a readable copy of the metadata (written last: a checkpoint is complete when it exists)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        # clone: tied weights (T5's shared embedding) are one tensor under two names, which safetensors refuses.
        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        # Each file replaced atomically: an interrupted save leaves the previous checkpoint intact.
        metadata = {"step": str(self.step), "meta": json.dumps(meta)}
        write_atomic(path / "state.safetensors", lambda f: save_file(tensors, str(f), metadata=metadata), replace=True)
        write_atomic(path / "state.json", lambda f: f.write_text(json.dumps(meta, indent=1)), replace=True)

    def load(self, path: str | Path) -> None:
        """Restore a checkpoint written by `save` into this trainer (same model and config shapes)."""
        path = Path(path)
        with safe_open(str(path / "state.safetensors"), "pt") as f:
            stored = f.metadata() or {}
        # The tensors' own metadata; state.json for checkpoints written before it was stored there.
        meta = json.loads(stored["meta"] if "meta" in stored else (path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
        ours = json.loads(json.dumps(asdict(self.cfg)))
        changed = sorted(k for k in ours if meta["config"].get(k) != ours[k])
        if changed:  # legitimate (e.g. more steps), but the run is then not the one the checkpoint started
            warnings.warn(f"resuming {path} with a different config: {', '.join(changed)}", stacklevel=2)
        pick = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = self.model.load_state_dict(pick("model."), strict=False)
        if unexpected or set(missing) - self._frozen():
            raise ValueError(
                f"{path}: checkpoint does not fit this model (missing {sorted(set(missing) - self._frozen())[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        if self.ema is not None:
            for k, v in pick("ema.").items():
                self.ema.shadow[k].copy_(v)
            self.ema.updates = meta["ema_updates"]
        state = {
            int(i): {name: tensors[f"optim.{i}.{name}"] for name in names}
            for i, names in meta["optim_state_keys"].items()
        }
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.rng.bit_generator.state = meta["numpy_rng"]
        self.step, self.history = meta["step"], meta["history"]
