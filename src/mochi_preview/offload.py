"""Memory modes: where each component's weights live, and what moves between the host and the device.

Modes (`MochiPipeline.set_memory_mode`; `LADDER` orders them from the most device memory to the least):
* resident: T5, the DiT and the VAE decoder stay on the device while the mode lasts.
* model: every component lives on the host; each is copied to the device for its stage, and the copy is dropped
  when the stage ends. One component on the device at a time.
* sequential: like model, and the DiT and T5 are "loaded partially": their small parts go up whole, the first DiT
  blocks the memory budget allows stay on the device for the whole stage, and the other blocks stream: block i+1's
  weights are copied (from pinned host memory, on a side CUDA stream) while block i computes, and a streamed block's
  device copy is dropped after it ran. With room for the whole DiT nothing streams, and sampling moves no bytes, as
  in the resident mode.
* auto: the first of resident, resident with T5 leaving after encoding, model, sequential whose estimate (`Footprint`:
  the parameter bytes of each component plus each stage's working memory) fits the budget; on a CPU device
  everything is resident (nothing moves).

The host tensor is the master. Going to the device swaps a separate device copy into the parameter (`param.data`);
leaving swaps the master back and releases the copy: weights are never copied back, unless they were changed in
place on the device (the parameter's version counter shows it), so no edit is lost. Every move runs outside
`torch.inference_mode`, so the weights stay ordinary tensors that a training step (a LoRA) can use afterwards.

A `Mover` makes the copies and keeps a `Ledger`: the device bytes its copies hold now, the peak per stage and the
bytes moved per stage. `LedgerMover` is the device stand-in of the tests and benchmarks: compute stays on the CPU,
every "device copy" is a separate host tensor (or a meta tensor, for meta weights) counted against a capacity, and
going over the capacity raises `torch.OutOfMemoryError`, as a full device would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

GIB = 2**30
MODES = ("auto", "resident", "model", "sequential")
LADDER = ("resident", "model", "sequential")  # most device memory first
ALIASES = {"none": "resident"}  # the old name of the resident mode (`pipe.offload`)
NAMES = {"resident": "resident", "model": "model offload", "sequential": "sequential offload"}
HOW = {  # how to ask for each mode: the API call, then the CLI flag
    "resident": ('pipe.set_memory_mode("resident")', "--memory resident"),
    "model": ("pipe.enable_model_cpu_offload()", "--memory model (--cpu_offload)"),
    "sequential": ("pipe.enable_sequential_cpu_offload()", "--memory sequential (--sequential_offload)"),
}
BUDGET_FRACTION = 0.9  # of an accelerator's memory: allocator fragmentation, library workspaces, other tensors
ESTIMATE_MARGIN = 1.2  # working-memory estimates are scaled by this (they come from CPU measurements)


def check_mode(mode: str) -> str:
    """The mode's canonical name ("none" is "resident"), or a ValueError naming the modes."""
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"memory mode must be one of {MODES}; got {mode!r}")
    return mode


def check_batch_cfg(batch_cfg: bool | str) -> bool | str:
    """True, False or "auto" ("on"/"off" as the CLI spells them)."""
    value = {"on": True, "off": False}.get(batch_cfg, batch_cfg) if isinstance(batch_cfg, str) else batch_cfg
    if value not in (True, False, "auto"):
        raise ValueError(f'batch_cfg must be True, False or "auto"; got {batch_cfg!r}')
    return value


# ---- the ledger and the movers -------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Device bytes held by the mover's copies (`live`), their peak during each stage, bytes moved to the device.

    `peaks[stage]` and `last_moved[stage]` describe the stage's latest run; `moved[stage]` adds up every run.
    `trace`, when a list, gets ("load" | "drop", name, bytes) for every move.
    """

    live: int = 0
    peaks: dict[str, int] = field(default_factory=dict)
    moved: dict[str, int] = field(default_factory=dict)
    last_moved: dict[str, int] = field(default_factory=dict)
    trace: list | None = None
    stage: str = "placement"  # what moves count under outside a pipeline stage
    _peak: int = 0

    def load(self, nbytes: int, name: str = "") -> None:
        self.live += nbytes
        self._peak = max(self._peak, self.live)
        self.moved[self.stage] = self.moved.get(self.stage, 0) + nbytes
        self.last_moved[self.stage] = self.last_moved.get(self.stage, 0) + nbytes
        if self.trace is not None:
            self.trace.append(("load", name, nbytes))

    def drop(self, nbytes: int, name: str = "") -> None:
        self.live -= nbytes
        if self.trace is not None:
            self.trace.append(("drop", name, nbytes))

    def new_generation(self) -> None:
        """Forget the previous generation's per-stage figures (`peaks`, `last_moved`)."""
        self.peaks.clear()
        self.last_moved.clear()

    @contextmanager
    def during(self, stage: str) -> Iterator[None]:
        """Count moves under `stage` and record the device bytes' peak while it runs."""
        outer, outer_peak = self.stage, self._peak
        self.stage, self._peak = stage, self.live
        self.last_moved[stage] = 0
        try:
            yield
        finally:
            self.peaks[stage] = self._peak
            self.stage, self._peak = outer, max(outer_peak, self._peak)


class Mover:
    """Copies weights from the host to `device`, drops the copies, and keeps the `ledger` of what is there.

    On a CPU device there is nothing to move (`copies` is False): the weights already are where they run.
    """

    budget_fraction = BUDGET_FRACTION

    def __init__(self, device: str | torch.device, ledger: Ledger | None = None):
        self.device = torch.device(device)
        self.ledger = ledger if ledger is not None else Ledger()
        self._side: torch.cuda.Stream | None = None

    @property
    def copies(self) -> bool:
        """Whether the device has its own memory, so that weights move to it."""
        return self.device.type not in ("cpu", "meta")

    @property
    def cuda(self) -> bool:
        """Whether copies can overlap compute (a side CUDA stream, pinned host memory)."""
        return self.device.type == "cuda"

    def reserve(self, nbytes: int) -> None:
        """Called before copying `nbytes` to the device (the ledger stand-in refuses what would not fit)."""

    def free_bytes(self) -> int:
        """Bytes the device could still hold (CUDA: free plus cached; CPU: available RAM)."""
        from .vae.decode import free_memory

        return free_memory(self.device)

    def budget(self) -> int:
        """Device bytes this pipeline may use: a fraction of the free memory plus what its own copies hold."""
        try:
            free = self.free_bytes()
        except RuntimeError:  # a host whose free memory cannot be read: plan as if there were room
            return 2**62
        return int(self.budget_fraction * (free + self.ledger.live))

    def to_device(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """A device copy of host tensor `t` (`t` itself when it already is on the device)."""
        return t.to(self.device, non_blocking=non_blocking)

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in page-locked host memory where that speeds up copies (CUDA), else `t`."""
        return t.pin_memory() if self.cuda and t.device.type == "cpu" and not t.is_pinned() else t

    def side_stream(self) -> torch.cuda.Stream | None:
        """The stream prefetches run on (CUDA), or None: copies are then synchronous."""
        if self.cuda and self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def release_cache(self) -> None:
        """Hand the memory of dropped copies back to the device (CUDA's caching allocator keeps it otherwise)."""
        if self.cuda:
            torch.cuda.empty_cache()


class LedgerMover(Mover):
    """A device stand-in: compute stays on the CPU, every move makes a separate copy that the ledger counts against
    `capacity` bytes, and a move beyond it raises `torch.OutOfMemoryError` (as a full device would)."""

    budget_fraction = 1.0

    def __init__(self, capacity: int, ledger: Ledger | None = None, strict: bool = True):
        super().__init__("cpu", ledger)
        self.capacity, self.strict = capacity, strict

    @property
    def copies(self) -> bool:
        return True

    def free_bytes(self) -> int:
        return max(0, self.capacity - self.ledger.live)

    def reserve(self, nbytes: int) -> None:
        if self.strict and self.ledger.live + nbytes > self.capacity:
            raise torch.OutOfMemoryError(
                f"ledger device: {nbytes / GIB:.3f} GiB more do not fit beside {self.ledger.live / GIB:.3f} GiB in "
                f"{self.capacity / GIB:.3f} GiB"
            )

    def to_device(self, t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return torch.empty_like(t) if t.is_meta else t.clone()


# ---- weights on and off the device ---------------------------------------------------------------------------------


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers, each once (tied weights are one tensor)."""
    seen, out = set(), []
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class Weights:
    """Tensors (parameters and buffers) that go to the device and leave it together: a block, or the rest of a model."""

    def __init__(self, tensors: list[torch.Tensor], name: str):
        self.tensors, self.name = tensors, name
        self.nbytes = nbytes(tensors)
        self._masters: list[torch.Tensor] | None = None  # the host tensors, while device copies are swapped in
        self._versions: list[int] = []
        self._placed = 0  # bytes the ledger counts for this group (copies that are not the masters themselves)
        self._ready: torch.cuda.Event | None = None  # an asynchronous copy's completion

    @property
    def loaded(self) -> bool:
        return self._masters is not None

    def load(self, mover: Mover, stream: torch.cuda.Stream | None = None) -> None:
        """Swap device copies in (on `stream`, asynchronously, when given; `wait` before use)."""
        if self._masters is not None or not mover.copies:
            return
        with torch.inference_mode(False), torch.no_grad():
            masters = [t.data for t in self.tensors]
            mover.reserve(self.nbytes)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                copies = [mover.to_device(m, non_blocking=stream is not None) for m in masters]
                if stream is not None:
                    self._ready = torch.cuda.Event()
                    self._ready.record(stream)
            for t, c in zip(self.tensors, copies):
                t.data = c
        # Copies that are the masters themselves (weights that already live on the device) take no new memory.
        self._placed = nbytes(c for c, m in zip(copies, masters) if c is not m)
        mover.ledger.load(self._placed, self.name)
        self._masters, self._versions = masters, [t._version for t in self.tensors]

    def wait(self, mover: Mover) -> None:
        """Make the compute stream wait for an asynchronous copy, and tell the allocator the copies are used there."""
        if self._ready is None:
            return
        current = torch.cuda.current_stream(mover.device)
        current.wait_event(self._ready)
        for t in self.tensors:
            t.data.record_stream(current)
        self._ready = None

    def drop(self, mover: Mover) -> None:
        """Swap the host masters back; the device copies are released (copied back only if changed in place)."""
        if self._masters is None:
            return
        with torch.inference_mode(False), torch.no_grad():
            for t, master, version in zip(self.tensors, self._masters, self._versions):
                if t._version != version and t.data is not master:
                    master.copy_(t.data)  # edited on the device (e.g. a LoRA merged in place): keep the edit
                t.data = master
        mover.ledger.drop(self._placed, self.name)
        self._masters, self._placed, self._ready = None, 0, None


class Component:
    """One model of the pipeline as groups of weights: its repeated blocks (the DiT's, T5's), and the rest."""

    def __init__(self, name: str, module: nn.Module, blocks: nn.ModuleList | None = None):
        self.name, self.module, self.block_list = name, module, blocks
        in_blocks = set()
        self.blocks: list[Weights] = []
        for i, block in enumerate(blocks or []):
            tensors = module_tensors(block)
            in_blocks |= {id(t) for t in tensors}
            self.blocks.append(Weights(tensors, f"{name}.block{i}"))
        self.rest = Weights([t for t in module_tensors(module) if id(t) not in in_blocks], f"{name}.rest")
        self._ids = {id(t) for g in self.groups for t in g.tensors}

    def stale(self) -> bool:
        """Whether the module now holds other tensors than these groups (a layer replaced or added, e.g. a LoRA)."""
        return {id(t) for t in module_tensors(self.module)} != self._ids

    @property
    def groups(self) -> list[Weights]:
        return [self.rest, *self.blocks]

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def loaded(self) -> bool:
        return any(g.loaded for g in self.groups)

    def load(self, mover: Mover) -> None:
        for g in self.groups:
            g.load(mover)

    def drop(self, mover: Mover) -> None:
        for g in self.groups:
            g.drop(mover)


class BlockStreamer:
    """Runs `component`'s blocks with the first `resident` of them on the device for the whole stage and the rest
    streamed: while block i computes, the next streamed block's weights are copied (a side stream on CUDA,
    synchronously elsewhere); after a streamed block ran its device copy is dropped. With `cyclic` (a model called
    many times, the DiT) the last block fetches the first streamed one for the next forward. At most two streamed
    blocks are on the device at a time.

    `before(i)` and `after(i)` run as forward hooks of block i (a benchmark may call them itself).
    """

    def __init__(self, component: Component, mover: Mover, resident: int, cyclic: bool = True):
        self.component, self.mover, self.cyclic = component, mover, cyclic
        self.groups = component.blocks
        self.resident = max(0, min(resident, len(self.groups)))
        self.streamed = list(range(self.resident, len(self.groups)))
        self._hooks: list = []

    def start(self) -> BlockStreamer:
        for g in self.groups[: self.resident]:
            g.load(self.mover)
        if self.mover.cuda:  # page-locked masters: copies that overlap compute
            with torch.inference_mode(False), torch.no_grad():
                for i in self.streamed:
                    for t in self.groups[i].tensors:
                        t.data = self.mover.pin(t.data)
        if self.streamed:
            self._fetch(self.streamed[0])
        if self.component.block_list is not None:
            for i, block in enumerate(self.component.block_list):
                self._hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self.before(i)))
                self._hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self.after(i)))
        return self

    def _fetch(self, i: int) -> None:
        self.groups[i].load(self.mover, stream=self.mover.side_stream())

    def before(self, i: int) -> None:
        group = self.groups[i]
        if i < self.resident:
            group.load(self.mover)  # a no-op unless it was dropped
            return
        if not group.loaded:  # not prefetched (an unusual order): fetch it now
            group.load(self.mover)
        group.wait(self.mover)
        k = self.streamed.index(i) + 1
        if k < len(self.streamed) or self.cyclic:
            nxt = self.streamed[k % len(self.streamed)]
            if nxt != i:
                self._fetch(nxt)

    def after(self, i: int) -> None:
        if i >= self.resident:
            self.groups[i].drop(self.mover)

    def stop(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.mover.synchronize()  # no copy may still be writing into memory about to be released
        for g in self.groups:
            g.drop(self.mover)


# ---- how much memory: sizes, estimates, the plan -------------------------------------------------------------------


def dit_working_bytes(dim_x: int, mlp_hidden_x: int, tokens: int, rows: int) -> int:
    """The DiT's working memory for one forward of `rows` videos of `tokens` visual tokens: per token and row about
    five visual-width and two MLP-width fp32 vectors alive at a block's peak, plus the RoPE tables (an upper bound of
    bench/bench_memory.py's measurement, 106.6 KiB per token at the published width)."""
    per_token = rows * (5 * dim_x + 2 * mlp_hidden_x) * 4 + dim_x * 4
    return int(ESTIMATE_MARGIN * tokens * per_token)


def t5_working_bytes(d_model: int, d_ff: int, heads: int, rows: int, length: int = 256) -> int:
    """T5's working memory for `rows` prompts: a few d_model and d_ff vectors per token, and the attention scores."""
    per_row = length * (6 * d_model + 2 * d_ff) * 4 + 2 * heads * length * length * 4
    return int(ESTIMATE_MARGIN * rows * per_row)


@dataclass(frozen=True)
class Footprint:
    """Bytes one generation needs on the device: each component's weights and each stage's working memory.

    `dit_work` is one DiT call with the CFG branches one after the other, `dit_work_batched` with both in one batch.
    """

    t5: int
    t5_rest: int
    t5_block: int
    dit: int
    dit_rest: int
    dit_block: int
    dit_blocks: int
    vae: int
    t5_work: int
    dit_work: int
    dit_work_batched: int
    vae_work: int

    def stage_needs(self, mode: str, t5_leaves: bool, batched: bool, resident_blocks: int = 0) -> dict[str, int]:
        """Peak bytes of each stage in `mode` (sequential: with `resident_blocks` DiT blocks kept on the device)."""
        work = self.dit_work_batched if batched else self.dit_work
        if mode == "resident":
            kept = self.dit + self.vae + (0 if t5_leaves else self.t5)
            return {
                "text": self.t5 + self.dit + self.vae + self.t5_work,
                "dit": kept + work,
                "vae": kept + self.vae_work,
            }
        if mode == "model":
            return {"text": self.t5 + self.t5_work, "dit": self.dit + work, "vae": self.vae + self.vae_work}
        streamed = resident_blocks < self.dit_blocks
        dit = self.dit_rest + (resident_blocks + 2) * self.dit_block if streamed else self.dit
        return {
            "text": self.t5_rest + 2 * self.t5_block + self.t5_work,
            "dit": dit + work,
            "vae": self.vae + self.vae_work,
        }

    def need(self, mode: str, t5_leaves: bool = False, batched: bool = False, resident_blocks: int = 0) -> int:
        return max(self.stage_needs(mode, t5_leaves, batched, resident_blocks).values())

    def resident_blocks(self, budget: int, batched: bool) -> int:
        """DiT blocks sequential offload keeps on the device: all when the whole DiT fits, else what the budget
        leaves after the rest, two streamed blocks and the working memory (at most all but two)."""
        work = self.dit_work_batched if batched else self.dit_work
        if self.dit + work <= budget:
            return self.dit_blocks
        room = budget - self.dit_rest - 2 * self.dit_block - work
        return max(0, min(self.dit_blocks - 2, room // max(self.dit_block, 1)))


def vae_floor_bytes(decoder: nn.Module, shape: tuple[int, ...]) -> int:
    """The VAE decode's least working memory for latents `shape` (B, 12, T, H, W): the float32 video plus one latent
    frame of one tile (its "auto" mode plans within whatever is free above that)."""
    from .vae.decode import TILE_SIZE, estimate_decode_bytes, output_bytes

    cfg = getattr(decoder, "config", None)
    if cfg is None:
        return 0
    b, _, t, h, w = shape
    dtype = next(decoder.parameters()).dtype
    tile = estimate_decode_bytes(cfg, b, 1, min(h, TILE_SIZE), min(w, TILE_SIZE), dtype, True, t)
    return output_bytes(cfg, shape) + tile


def footprint(
    dit: nn.Module,
    decoder: nn.Module,
    t5: nn.Module | None,
    shape: tuple[int, ...],
    guided: bool = True,
    t5_length: int = 256,
    ranks: int = 1,
) -> Footprint:
    """What a generation of latents `shape` (B, 12, T, H, W) needs on the device: the parameter bytes of the DiT, the
    VAE decoder and T5 (a transformers T5 encoder; None once unloaded) as the modes move them, and each stage's
    working memory (`ranks`: processes sharing the visual tokens). Works on meta-device models (no memory)."""
    b, _, t, h, w = shape
    rows = 2 * b if guided else b
    d = Component("dit", dit, dit.blocks)
    e = Component("text_encoder", t5, t5.encoder.block) if t5 is not None else None
    cfg, p = dit.cfg, dit.cfg.patch_size
    tokens = -(-t * (h // p) * (w // p) // ranks)
    largest = lambda c: max((g.nbytes for g in c.blocks), default=0)  # noqa: E731
    return Footprint(
        t5=e.nbytes if e else 0,
        t5_rest=e.rest.nbytes if e else 0,
        t5_block=largest(e) if e else 0,
        dit=d.nbytes,
        dit_rest=d.rest.nbytes,
        dit_block=largest(d),
        dit_blocks=len(d.blocks),
        vae=nbytes(module_tensors(decoder)),
        t5_work=t5_working_bytes(t5.config.d_model, t5.config.d_ff, t5.config.num_heads, rows, t5_length) if e else 0,
        dit_work=dit_working_bytes(cfg.dim_x, cfg.mlp_hidden_x, tokens, b),
        dit_work_batched=dit_working_bytes(cfg.dim_x, cfg.mlp_hidden_x, tokens, rows),
        vae_work=vae_floor_bytes(decoder, shape),
    )


@dataclass(frozen=True)
class Plan:
    """A memory mode resolved for one request: what the pipeline does, and why.

    `asked`: the mode set ("auto" or a mode); `mode`: resident, model or sequential; `t5_leaves`: T5 leaves the device
    after encoding; `dit_blocks_resident` of `dit_blocks` stay on the device while sampling (the rest stream);
    `batch_cfg`: both CFG branches in one DiT call; `budget` and `need`: the device bytes available and the estimate
    of the mode's peak; `device`: where it runs.
    """

    asked: str
    mode: str
    t5_leaves: bool
    dit_blocks_resident: int
    dit_blocks: int
    batch_cfg: bool
    budget: int
    need: int
    device: str

    def record(self) -> dict:
        """The sidecar's "memory" entry."""
        out = asdict(self)
        out.pop("batch_cfg")  # recorded on its own
        return out

    def describe(self) -> str:
        """One line for the console."""
        if self.device in ("cpu", "meta"):
            where = f"{self.device}: the weights stay in RAM, nothing moves"
        else:
            where = f"needs about {self.need / GIB:.1f} GiB of {self.budget / GIB:.1f} GiB available on {self.device}"
        what = NAMES[self.mode]
        if self.mode == "resident" and self.t5_leaves:
            what += ", T5 leaves the device after encoding"
        if self.mode == "sequential":
            what += f", {self.dit_blocks_resident} of {self.dit_blocks} DiT blocks resident"
        chose = "auto chose" if self.asked == "auto" else "mode"
        return f"memory: {chose} {what} ({where}); CFG branches {'batched' if self.batch_cfg else 'one by one'}"


def choose(
    asked: str,
    fp: Footprint,
    budget: int,
    device: torch.device,
    copies: bool,
    batch_cfg: bool | str = "auto",
    sequential_ok: bool = True,
) -> Plan:
    """The plan for `asked` (a mode, or "auto": the first of the ladder whose estimate fits `budget` bytes)."""
    forced = batch_cfg if isinstance(batch_cfg, bool) else None
    batched0 = bool(forced)  # what the mode is sized for: batched only when asked for
    if not copies and asked == "auto":  # the device is the host: everything stays where it is
        mode, t5_leaves = "resident", False
    elif asked != "auto":  # (on the host it changes nothing: no mode moves anything there)
        mode, t5_leaves = asked, asked != "resident"
    else:
        options = [("resident", False), ("resident", True), ("model", True)]
        options += [("sequential", True)] if sequential_ok else []
        fits = [o for o in options if fp.need(*o, batched0) <= budget]
        mode, t5_leaves = fits[0] if fits else options[-1]
    if forced is not None:
        batched = forced
    elif not copies:
        batched = fp.dit_work_batched <= budget  # on the host: when the activations fit the free RAM
    elif mode == "sequential":  # when it fits, and streams no more blocks per step than one branch at a time
        fits = fp.stage_needs(mode, t5_leaves, True)["dit"] <= budget
        copies_per_step = lambda b: (fp.dit_blocks - fp.resident_blocks(budget, b)) * (1 if b else 2)  # noqa: E731
        batched = fits and copies_per_step(True) <= copies_per_step(False)
    else:  # when the DiT stage has room for both branches (the mode is sized for one)
        batched = fp.stage_needs(mode, t5_leaves, True)["dit"] <= budget
    blocks = fp.resident_blocks(budget, batched) if mode == "sequential" else fp.dit_blocks
    return Plan(
        asked=asked,
        mode=mode,
        t5_leaves=t5_leaves,
        dit_blocks_resident=int(blocks),
        dit_blocks=fp.dit_blocks,
        batch_cfg=batched,
        budget=int(budget),
        need=int(fp.need(mode, t5_leaves, batched, blocks)),
        device=str(device),
    )


def next_mode_advice(mode: str, fp: Footprint | None, budget: int | None, batched: bool) -> str:
    """The memory mode to try after `mode` ran out of memory: the next of the ladder that fits (by the estimate),
    named with its API call and CLI flag; then the least-memory one as a further step. Empty after sequential."""
    later = list(LADDER[LADDER.index(mode) + 1 :])
    if not later:
        return ""
    fits = [m for m in later if fp is None or budget is None or fp.need(m, True, batched) <= budget]
    first = fits[0] if fits else later[-1]
    tip = f"the next memory mode that fits: {NAMES[first]}, {HOW[first][0]}, or {HOW[first][1]}"
    if first != LADDER[-1]:
        last = LADDER[-1]
        tip += f"; the least device memory: {NAMES[last]}, {HOW[last][0]}, or {HOW[last][1]}"
    return tip


# ---- the modes at work ---------------------------------------------------------------------------------------------


class DeviceMemory:
    """The pipeline's weights under a memory mode: what is on the device, and what goes up for each stage.

    `components` maps a stage's component name ("text_encoder", "dit", "decoder") to a function returning
    (module or None, its streamable blocks or None) for the current objects.
    """

    def __init__(self, components: dict[str, Callable[[], tuple]], mover: Mover, mode: str = "auto"):
        self._sources = components
        self._components: dict[str, Component] = {}
        self.mover = mover
        self.mode = check_mode(mode)
        self.budget_bytes: int | None = None  # a fixed budget instead of the device's free memory
        self.plan: Plan | None = None  # the plan in force (the latest resolved)
        self.streamer: BlockStreamer | None = None  # the DiT's (or T5's) streaming, during its stage

    @property
    def ledger(self) -> Ledger:
        return self.mover.ledger

    def component(self, name: str) -> Component | None:
        module, blocks = self._sources[name]()
        if module is None:
            return None
        c = self._components.get(name)
        if c is not None and c.loaded and (c.module is not module or c.stale()):
            c.drop(self.mover)  # the weights changed under it (a new module, a LoRA): place them afresh
        if c is None or not c.loaded:  # rebuilt while off the device: it sees the module's weights as they are now
            c = self._components[name] = Component(name, module, blocks)
        return c

    def forget(self, name: str) -> None:
        """Drop a component's device copies and forget it (its weights are about to be freed)."""
        if (c := self._components.pop(name, None)) is not None:
            c.drop(self.mover)

    def budget(self) -> int:
        return self.budget_bytes if self.budget_bytes is not None else self.mover.budget()

    def set_mover(self, mover: Mover) -> None:
        self.drop_all()
        self.mover = mover

    def drop_all(self, keep: tuple[str, ...] = ()) -> None:
        dropped = [c for name, c in self._components.items() if name not in keep and c.loaded]
        for c in dropped:
            c.drop(self.mover)
        if dropped:
            self.mover.release_cache()

    def apply(self, plan: Plan) -> None:
        """Place the weights as `plan` wants them between stages: resident modes load the DiT and the VAE (and T5
        unless it leaves after encoding); the offload modes keep nothing on the device."""
        self.plan = plan
        if plan.mode != "resident":
            self.drop_all()
            return
        names = ("dit", "decoder") if plan.t5_leaves else ("text_encoder", "dit", "decoder")
        if plan.t5_leaves:
            self.drop_all(keep=names)
        for name in names:
            if (c := self.component(name)) is not None:
                c.load(self.mover)

    @contextmanager
    def use(self, name: str, plan: Plan) -> Iterator[None]:
        """`name`'s weights on the device for its stage, as `plan` wants them."""
        c = self.component(name)
        if c is None or not self.mover.copies:
            yield
            return
        if plan.mode == "resident":
            if name == "text_encoder" or not c.loaded:
                c.load(self.mover)
            try:
                yield
            finally:
                if name == "text_encoder" and plan.t5_leaves:
                    c.drop(self.mover)
                    self.mover.release_cache()
            return
        self.drop_all(keep=(name,))  # one component at a time
        streaming = plan.mode == "sequential" and c.blocks
        resident = plan.dit_blocks_resident if name == "dit" else 0
        try:
            if streaming and resident < len(c.blocks):
                c.rest.load(self.mover)
                self.streamer = BlockStreamer(c, self.mover, resident, cyclic=name == "dit").start()
            else:
                c.load(self.mover)
            yield
        finally:
            if self.streamer is not None:
                self.streamer.stop()
                self.streamer = None
            c.drop(self.mover)
            self.mover.release_cache()
