"""Context-parallel generation over torch.distributed: N processes (one per GPU, or CPU processes) make one video.

* Sequence parallelism (Ulysses): each rank of a sequence group of G ranks keeps M = ceil(N / G) of the N visual
  tokens (zero tokens pad the last rank). Around attention, an all-to-all swaps tokens for heads: every rank attends
  over all N real tokens for H / G heads (the padding is cut before attention and restored after it, so it never
  serves as a key), then a second all-to-all swaps back. Text tokens, the conditioning and the text stream are
  replicated; the final visual outputs are all-gathered. The DiT gets this as its token layout (dit/tokens.py):
  `dit.set_token_layout(cp.token_layout())`.
* CFG parallelism: with `cfg_parallel` and an even world size, ranks [0, N/2) run the conditional pass and
  [N/2, N) the unconditional one, each half a sequence group of N/2; rank i and rank i + N/2 swap velocities.
* Weights: replicated by default; `shard_dit` keeps block i only on rank i mod N, broadcast just before it runs (on
  `ContextParallel.device`, wherever the block's weights sit: a memory mode may keep them on the CPU), fp8 weights
  and their scales included. LoRAs (`lora.py`): a merged one is merged (and restored) by each block's owner, so the
  broadcast carries it; a live one's tensors stay on every rank, beside the block they serve.
* Pixel inputs (`conditioning.py`): every rank encodes the same input in the same tiles (planned for the smallest
  budget) and anchors the same latents, so every rank steps the same video.
* Failures: a rank that raises inside `guard()` posts its rank and error in the process group's store; every other
  rank stops with that message, either from the collective that fails when the rank goes away or, if that rank's
  process lives on, from a watcher thread that sees the post. Collectives also carry a timeout. The store's host
  (global rank 0 outside torchrun's agent) waits, bounded, for every rank to read the post before it exits.
* Agreement: every choice that shapes a collective is the same on every rank. The device follows LOCAL_RANK and the
  backend follows the device (NCCL for CUDA, gloo for CPU). The token split, the CFG halves and the block owners
  depend on the rank count and the batch size only; ContextParallel and BlockSharding check at construction that
  every rank passed the same settings and holds the same blocks (`same_on_every_rank`). What a rank measures for
  itself (free memory) is reduced to one value first (`agree_min`; vae/decode.py does this for its "auto" plan).
* Memory modes: sequential CPU offload does not combine with context parallelism; `check_compatible` says so before
  any work. Model CPU offload combines with it, sharded or not.

Launch: `torchrun --nproc_per_node=N -m mochi_preview.infer ...`, or `init_distributed(device=...)` then
`pipe.enable_context_parallel()` inside any process group.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .dit.tokens import TokenLayout

DEFAULT_TIMEOUT = 600.0  # seconds a collective may wait for a peer before it fails
FAILED_KEY = "mochi_preview/failed"  # store key holding "<rank>:<message>" of the first rank that failed
POLL_SECONDS = 0.5  # how often the watcher looks for a failure post
GRACE_SECONDS = 3.0  # time the main thread gets to notice a peer's failure itself before the watcher exits
NOTICED_KEY = "mochi_preview/noticed"  # store counter: ranks that have read the failure post
LINGER_SECONDS = 6.0  # longest the store's host waits, after a failure, for every rank to read the post
_failure_seen = threading.Event()  # after a failure, destroying the group at exit could wait on a dead peer


class RankFailedError(RuntimeError):
    """Another rank of the group failed; this rank stops too."""


def default_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun on a CUDA machine (the current CUDA device when
    LOCAL_RANK is not set), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device this rank computes on: `device` as given, "cuda" without an index meaning this rank's GPU
    (cuda:LOCAL_RANK), None the `default_device()`."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        return torch.device("cuda", index)
    return device


def backend_for(device: str | torch.device) -> str:
    """The torch.distributed backend for collectives on `device`: NCCL for CUDA, gloo for the CPU."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"context parallelism runs on CUDA (NCCL) or CPU (gloo) devices, not {kind!r}")
    return "nccl" if kind == "cuda" else "gloo"


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse a process group that cannot carry `device`'s tensors (NCCL carries only CUDA tensors)."""
    if device.type == "cpu" and str(backend).lower() == "nccl":
        raise ValueError(
            "the process group uses NCCL, which carries CUDA tensors only, but this rank computes on the CPU: "
            "create the group with gloo (init_distributed(device='cpu')) or compute on the GPU (device='cuda')"
        )


def init_distributed(timeout: float = DEFAULT_TIMEOUT, device: str | torch.device | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...) -> this rank's device.

    The backend follows the device (`resolve_device`): NCCL for a GPU (cuda:LOCAL_RANK, made the current device),
    gloo for the CPU, also on a machine with GPUs (`device="cpu"`). A group that exists already is kept.
    """
    device = resolve_device(device)
    backend = backend_for(device)
    if dist.is_initialized():
        return device
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no process group: launch with `torchrun --nproc_per_node=N ...` (which sets RANK etc.)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} was asked for, but CUDA is not available here; use device='cpu'")
        torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout), device_id=device)
    else:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    atexit.register(_destroy_at_exit)  # we made the group, we end it
    return device


def _destroy_at_exit() -> None:
    if dist.is_initialized() and not _failure_seen.is_set():
        dist.destroy_process_group()


def launched_world_size() -> int:
    """Processes torchrun started for this job (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- agreement between ranks ---------------------------------------------------------------------------------


def _scalar_device(group, device: torch.device | None) -> torch.device:
    """Where a few integers travel in `group`: the CPU when its backend has gloo, else this rank's GPU."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    return device if device is not None else default_device()


def min_max(values: Sequence[int], group=None, device: torch.device | None = None) -> tuple[list[int], list[int]]:
    """Element-wise minimum and maximum of the ranks' integer `values` (one all-reduce), on every rank of `group`.

    `device`: this rank's GPU for an NCCL group (default: `default_device()`); gloo groups use the CPU."""
    t = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=_scalar_device(group, device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    n = len(values)
    return t[:n].tolist(), [-v for v in t[n:].tolist()]


def agree_min(value: int, group=None, device: torch.device | None = None) -> int:
    """The smallest of the ranks' `value`s, on every rank: a per-rank measure (free memory) made one decision."""
    return min_max([value], group, device)[0][0]


def same_on_every_rank(what: str, group=None, device: torch.device | None = None, **values: int) -> None:
    """Raise ValueError on every rank (not only the odd one) when some rank passed other integer `values`. Every
    rank must pass the same names (one all-reduce of that many numbers)."""
    low, high = min_max(list(values.values()), group, device)
    differ = [f"{name} (from {lo} to {hi})" for name, lo, hi in zip(values, low, high) if lo != hi]
    if differ:
        raise ValueError(f"{what} must be the same on every rank, but these differ between ranks: {', '.join(differ)}")


def is_sharded(dit: nn.Module) -> bool:
    """Whether `dit`'s blocks are spread over ranks (`shard_dit`, `load_dit_sharded`)."""
    return getattr(dit, "block_sharding", None) is not None


OFFLOAD_MODES = ("none", "resident", "auto", "model", "sequential")  # "none" is "resident"'s older name


def check_compatible(offload: str, context_parallel: bool, sharded: bool = False) -> None:
    """Refuse, before any work, a memory mode (`offload`: "none"/"resident", "model", "sequential"; "auto" must not
    pick "sequential" under context parallelism) that context parallelism (`context_parallel`), with the DiT's blocks
    spread over the ranks or not (`sharded`), cannot run with. Model offload moves whole components between stages
    and combines with both: a sharded DiT's broadcasts run on `ContextParallel.device` wherever its weights sit."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, not {offload!r}")
    if offload == "sequential" and context_parallel:
        if sharded:
            raise ValueError(
                "sequential CPU offload (--sequential_offload) and shard_dit (--shard_dit) do not combine: sharding "
                "already keeps only 1/N of the DiT's blocks on each rank; to also keep the models off the GPU "
                "between stages use model CPU offload (enable_model_cpu_offload(), --cpu_offload)"
            )
        raise ValueError(
            "sequential CPU offload (--sequential_offload) and context parallelism do not combine: to hold less of "
            "the DiT on each GPU use shard_dit (--shard_dit: each rank keeps 1/N of its blocks), and/or model CPU "
            "offload (enable_model_cpu_offload(), --cpu_offload)"
        )


class ContextParallel:
    """The ranks of `group` making one video: the DiT's token layout, CFG halves, failure propagation."""

    def __init__(self, group: dist.ProcessGroup | None = None, cfg_parallel: bool | None = None, device=None):
        """`cfg_parallel` None: on when the rank count is even (one all-gather per step instead of two passes)."""
        if not dist.is_initialized():
            raise RuntimeError(
                "no process group: run under torchrun and call mochi_preview.distributed.init_distributed() (or "
                "torch.distributed.init_process_group) first"
            )
        self.group = group or dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.global_ranks = dist.get_process_group_ranks(self.group)  # group rank -> global rank
        self.global_rank = self.global_ranks[self.rank]  # what torchrun and the messages call this rank
        self.device = resolve_device(device)  # None or "cuda": cuda:LOCAL_RANK (not the current device)
        check_backend(dist.get_backend(self.group), self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # so that "cuda" in this process means this rank's GPU
        if cfg_parallel is None:
            cfg_parallel = self.world_size % 2 == 0
        if cfg_parallel and self.world_size % 2:
            raise ValueError(f"CFG parallelism needs an even number of ranks; got {self.world_size}")
        # The halves are subgroups made by their members only: ranks that disagreed here would wait forever.
        cuda = int(self.device.type == "cuda")
        same_on_every_rank("ContextParallel's settings", self.group, self.device, cfg_parallel=cfg_parallel, cuda=cuda)
        halves = 2 if cfg_parallel else 1
        self.seq_size = self.world_size // halves
        self.cfg_rank, self.seq_rank = divmod(self.rank, self.seq_size)  # cfg_rank 0: conditional, 1: unconditional
        if halves == 1:
            self.seq_group, self.cfg_group = self.group, None
        else:
            # Only the members of a subgroup take part in making it (`group` may be a part of the world); every
            # rank makes its half first, then its pair, so no two ranks wait on each other in opposite orders.
            half = self.global_ranks[self.cfg_rank * self.seq_size : (self.cfg_rank + 1) * self.seq_size]
            pair = self.global_ranks[self.seq_rank :: self.seq_size]  # rank i and rank i + N/2
            self.seq_group = dist.new_group(half, use_local_synchronization=True)
            self.cfg_group = dist.new_group(pair, use_local_synchronization=True)
        self.bytes_sent = 0  # by this rank's collectives since construction (benchmarks read it)
        self._store = dist.distributed_c10d._get_default_store()
        self._noticed = threading.Event()  # set once this rank has seen a failure itself (or is closing)
        self._watcher = threading.Thread(target=self._watch, name="mochi-failure-watcher", daemon=True)
        self._watcher.start()
        atexit.register(self.close)  # stop polling the store before the interpreter tears it down

    @property
    def is_main(self) -> bool:
        """Rank 0 of the group: the one that writes files and shows progress."""
        return self.rank == 0

    # ---- sequence parallelism ------------------------------------------------------------------------------

    def token_layout(self) -> TokenLayout:
        """What the DiT shares with the other ranks of its sequence group (`AsymmDiT.set_token_layout`): nothing
        (the one-process layout) when each CFG half is one rank, else its tokens and heads (`SequenceParallel`)."""
        return SequenceParallel(self) if self.seq_size > 1 else TokenLayout()

    def all_to_all(self, send: torch.Tensor, group) -> torch.Tensor:
        """Chunk g of `send`'s first axis goes to rank g of `group`; chunk g of the result came from rank g."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        size = dist.get_world_size(group)
        self.bytes_sent += send.nbytes * (size - 1) // size
        return recv

    def all_gather(self, t: torch.Tensor, group) -> list[torch.Tensor]:
        """Every rank's `t` (same shape everywhere), in rank order."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        self.bytes_sent += t.nbytes * (len(parts) - 1)
        return parts

    # ---- failures ------------------------------------------------------------------------------------------

    @contextmanager
    def guard(self):
        """Run a piece of SPMD work: if it raises here, the other ranks stop; if another rank failed, say which."""
        try:
            yield
        except RankFailedError:
            raise
        except BaseException as e:
            self._noticed.set()
            _failure_seen.set()
            # The first post wins: a peer's later error (e.g. a closed connection) is a consequence of it.
            post = self._post(f"rank {self.global_rank} failed: {_describe(e)}")
            if post is None:  # the store went with the process that held it (killed): nothing to name
                raise
            rank, message = post
            self._linger()
            if rank != self.global_rank:
                raise RankFailedError(f"{message} (rank {self.global_rank} stopped)") from e
            raise

    def _post(self, message: str) -> tuple[int, str] | None:
        """Post this rank's failure unless one is there: -> (rank, message) of the first post, None without a store."""
        try:
            rank, first = (
                self._store.compare_set(FAILED_KEY, "", f"{self.global_rank}:{message}").decode().split(":", 1)
            )
            self._store.add(NOTICED_KEY, 1)
        except Exception:
            return None
        return int(rank), first

    def _watch(self) -> None:
        """Stop this process when another rank posted a failure that the main thread has not noticed in time."""
        me = self.global_rank
        while not self._noticed.wait(POLL_SECONDS):
            try:
                if not self._store.check([FAILED_KEY]):
                    continue
                rank, message = self._store.get(FAILED_KEY).decode().split(":", 1)
            except Exception:  # the store went away (the job is over): nothing left to watch
                return
            if int(rank) == me or self._noticed.wait(GRACE_SECONDS):
                return
            # The main thread is stuck in a collective with a rank that will never answer: no clean way out.
            print(f"error: {message} (rank {me} stopped)", file=sys.stderr, flush=True)
            try:
                self._store.add(NOTICED_KEY, 1)
                self._linger()
            finally:
                os._exit(1)

    def _linger(self) -> None:
        """After a failure, keep the store alive until every rank has read the post (or LINGER_SECONDS passed).

        Launched with env:// outside torchrun's agent, global rank 0 holds the store: if it exited at once, a rank
        whose collective failed only after that could not learn which rank failed first.
        """
        if self.global_rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        deadline = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < deadline:
            try:
                if self._store.add(NOTICED_KEY, 0) >= self.world_size:
                    return
            except Exception:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the failure watcher (before destroying the process group; also done at exit)."""
        self._noticed.set()
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5.0)

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' `value`s (e.g. a memory budget each rank measured), on every rank."""
        return agree_min(value, self.group, self.device)

    def broadcast_object(self, obj):
        """Rank 0's value of `obj` on every rank (e.g. a decision that depends on rank 0's files)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_ranks[0], group=self.group)
        return box[0]


class SequenceParallel(TokenLayout):
    """Ulysses token layout over a sequence group of G ranks: M = ceil(N / G) tokens per rank, H / G heads each.

    The last rank's share is padded with zero tokens; the padding is cut before attention and restored after it,
    so it never serves as a key.
    """

    def __init__(self, cp: ContextParallel):
        self.cp = cp
        self.size, self.rank = cp.seq_size, cp.seq_rank

    def _share(self, num_tokens: int) -> int:
        return -(-num_tokens // self.size)  # M = ceil(N / G)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, G M, D) with zero tokens at the end."""
        return F.pad(x, (0, 0, 0, self._share(x.shape[1]) * self.size - x.shape[1]))

    def split_tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = self._share(x.shape[1])
        return self._pad(x)[:, self.rank * m : (self.rank + 1) * m]

    def tokens_to_heads(self, qkv: torch.Tensor, num_tokens: int) -> torch.Tensor:
        send = rearrange(qkv, "b m (three g hd) -> g b m three hd", three=3, g=self.size).contiguous()
        recv = self.cp.all_to_all(send, self.cp.seq_group)  # chunk g: rank g's tokens for our heads
        return rearrange(recv, "g b m three hd -> b (g m) (three hd)")[:, :num_tokens]

    def heads_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        send = rearrange(self._pad(out), "b (g m) hd -> g b m hd", g=self.size).contiguous()  # padding: zeros
        recv = self.cp.all_to_all(send, self.cp.seq_group)  # chunk g: our tokens for rank g's heads
        return rearrange(recv, "g b m hd -> b m (g hd)")

    def local_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(self.size, dim=dim)[self.rank]

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.cp.all_gather(t, self.cp.seq_group), dim=-1)

    def gather_tokens(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return torch.cat(self.cp.all_gather(x, self.cp.seq_group), dim=1)[:, :num_tokens]


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class CFGParallelDiT:
    """The DiT as the batched-CFG sampler calls it ([cond; uncond] batch): this half of the ranks runs one half.

    The rows are independent, so any even batch splits the same way. An odd batch (the prompts alone: the sampler
    skips the unconditional pass at a step whose guidance is 1) runs whole on both halves, nothing exchanged.
    """

    def __init__(self, dit: nn.Module, cp: ContextParallel):
        if cp.cfg_group is None:
            raise ValueError("CFGParallelDiT needs a ContextParallel made with cfg_parallel=True")
        self.dit, self.cp = dit, cp

    def __call__(self, z, sigma, features, mask) -> torch.Tensor:
        """z (2B, C, T, H, W), [cond; uncond] -> velocity (2B, C, T, H, W), both halves on every rank."""
        if z.shape[0] % 2:  # the batch size is the same on every rank, so is this choice
            return self.dit(z, sigma, features, mask).float()
        b = z.shape[0] // 2
        mine = slice(self.cp.cfg_rank * b, (self.cp.cfg_rank + 1) * b)
        v = self.dit(z[mine], sigma[mine], features[mine], mask[mine]).float()
        return torch.cat(self.cp.all_gather(v, self.cp.cfg_group))  # cfg rank 0 holds cond: [cond; uncond]


# ---- DiT weights sharded by blocks -----------------------------------------------------------------------------


class BlockSharding:
    """Block i of the DiT lives on rank i mod N only; it is broadcast to the others just before it runs (the next
    block's broadcast overlaps this block's compute) and dropped after, so a rank holds ~depth/N + 2 blocks.

    What travels is a block's parameters and persistent buffers (an fp8 layer's scales; fp8 data goes as bytes, which
    every backend carries). Non-persistent buffers (a live LoRA's A and B) stay on every rank.
    """

    def __init__(self, blocks: nn.ModuleList, cp: ContextParallel):
        self.cp = cp
        self.owner = [i % cp.world_size for i in range(len(blocks))]
        # (module, name, shape, dtype) of each block's tensors: the empty placeholders keep neither shape nor data
        self.params = [[(m, name, t.shape, t.dtype) for m, name, t in _stored_tensors(block)] for block in blocks]
        self.pending: dict[int, list] = {}  # block index -> [(work, flat buffer, params of that dtype)]
        self.blocks = blocks
        # What travels is sized from each rank's own copy of the model: every rank must hold the same one. (The
        # block count first: the per-block check sends one number per block.)
        same_on_every_rank("the sharded DiT", cp.group, cp.device, blocks=len(blocks))
        nbytes = [sum(shape.numel() * dtype.itemsize for _, _, shape, dtype in block) for block in self.params]
        same_on_every_rank(
            "the sharded DiT", cp.group, cp.device, **{f"block {i} bytes": n for i, n in enumerate(nbytes)}
        )
        for i, block in enumerate(blocks):
            if self.owner[i] != cp.rank:
                self._release(i)
            block.register_forward_pre_hook(lambda module, args, i=i: self._gather(i))
            block.register_forward_hook(lambda module, args, out, i=i: self._release(i))

    def _start(self, i: int) -> None:
        """Launch block i's broadcast: one flat buffer per dtype (fp32 QK-norm weights, bf16 the rest)."""
        by_dtype: dict[torch.dtype, list] = {}
        for entry in self.params[i]:
            by_dtype.setdefault(entry[3], []).append(entry)
        mine = self.owner[i] == self.cp.rank
        device = self.cp.device  # where collectives run, wherever the block's weights sit now (offload: the CPU)
        works = []
        for dtype, entries in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):  # same order on every rank
            if mine:
                flat = torch.cat([getattr(m, name).reshape(-1) for m, name, _, _ in entries]).to(device)
            else:
                with torch.inference_mode(False):  # a plain tensor: the parameters will hold views of it
                    flat = torch.empty(sum(shape.numel() for _, _, shape, _ in entries), dtype=dtype, device=device)
            src = self.cp.global_ranks[self.owner[i]]
            wire = flat.view(torch.uint8) if dtype.itemsize == 1 else flat  # gloo has no fp8 types
            works.append((dist.broadcast(wire, src=src, group=self.cp.group, async_op=True), flat, entries))
            if mine:
                self.cp.bytes_sent += flat.nbytes * (self.cp.world_size - 1)
        self.pending[i] = works

    def _gather(self, i: int) -> None:
        if i not in self.pending:
            self._start(i)
        for work, flat, entries in self.pending.pop(i):
            work.wait()
            if self.owner[i] != self.cp.rank:
                offset = 0
                with torch.inference_mode(False), torch.no_grad():
                    for m, name, shape, _ in entries:
                        getattr(m, name).data = flat[offset : offset + shape.numel()].view(shape)
                        offset += shape.numel()
        if i + 1 < len(self.blocks):
            self._start(i + 1)  # prefetch: it travels while block i computes

    def _release(self, i: int) -> None:
        """Drop block i's weights (not this rank's): each parameter keeps its identity and holds an empty plain
        tensor, so that whatever tracks the parameters (the pipeline's memory modes) still sees the module's own."""
        if self.owner[i] == self.cp.rank:
            return
        with torch.inference_mode(False), torch.no_grad():
            for m, name, _, dtype in self.params[i]:
                p = getattr(m, name)
                if p.is_meta:  # never read (load_dit_sharded): a real, empty tensor once, reused after
                    empty = torch.empty(0, dtype=dtype, device=self.cp.device)
                    if name in m._buffers:
                        m._buffers[name] = empty
                    else:
                        setattr(m, name, nn.Parameter(empty, requires_grad=False))
                else:
                    p.data = torch.empty(0, dtype=dtype, device=p.device)


def _stored_tensors(block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of a block's parameters and persistent buffers: what its checkpoint holds."""
    out = []
    for m in block.modules():
        out += [(m, name, p) for name, p in m.named_parameters(recurse=False)]
        out += [(m, name, b) for name, b in m.named_buffers(recurse=False) if name not in m._non_persistent_buffers_set]
    return out


def shard_dit(dit: nn.Module, cp: ContextParallel) -> nn.Module:
    """Keep only this rank's blocks of `dit` (block i on rank i mod N); the others arrive by broadcast when needed."""
    if getattr(dit, "block_sharding", None) is not None:
        return dit
    dit.block_sharding = BlockSharding(dit.blocks, cp)
    return dit


def load_dit_sharded(
    path: str | Path,
    cp: ContextParallel,
    dtype: torch.dtype = torch.bfloat16,
    attention_backend: str = "sdpa",
    fp8: str | None = None,
) -> nn.Module:
    """Load a DiT reading only this rank's blocks (and the small shared layers) from the checkpoint, onto cp.device
    (`fp8`: as `load_dit`'s, the blocks' weights in float8 with their scales)."""
    from .dit import load_dit

    mine = lambda i: i % cp.world_size == cp.rank  # block i lives on rank i mod N (BlockSharding)
    dit = load_dit(path, dtype=dtype, device=cp.device, attention_backend=attention_backend, fp8=fp8, keep_block=mine)
    return shard_dit(dit, cp)
