"""Several GPUs, one command: the CLI starts torch's elastic launcher (torchrun) itself, one process per GPU.

Plain `python -m mochi_preview.infer ...` on a machine with several GPUs runs as
`torchrun --standalone --nproc_per_node=<GPUs> -m mochi_preview.infer ...` would (as Genmo's CLI uses every GPU);
`--gpus N` chooses N of them and `--gpus 1` one process. With `--device cpu`, `--gpus N` runs N CPU processes (gloo):
that is how it is tested.
"""

from __future__ import annotations

import logging
import os

import torch

MODULE = "mochi_preview.infer"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launched() -> bool:
    """True inside a process torchrun (or this module) started."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def processes(gpus: int | None, device: str | None) -> int:
    """How many processes a run uses: `gpus` (checked), else every GPU when no single device is named; 1 inside a
    launched process. ValueError naming --gpus when it asks for more GPUs than there are."""
    if launched():
        return 1
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus must be at least 1; got {gpus}")
    on_cpu = device is not None and torch.device(device).type == "cpu"
    if on_cpu:
        return gpus or 1
    count = gpu_count()
    if gpus is None:
        return count if count > 1 and (device is None or device == "cuda") else 1
    if gpus > 1 and device not in (None, "cuda"):
        raise ValueError(f"--gpus {gpus} uses GPUs 0 to {gpus - 1}: give --device cuda or none, not --device {device}")
    if gpus > max(count, 1):
        raise ValueError(f"--gpus {gpus}: this machine has {count} GPU(s) (valid: 1 to {max(count, 1)})")
    return gpus


def launch(n: int, argv: list[str]) -> int:
    """Run the CLI with `argv` in `n` processes under torch's elastic launcher; the exit code of the first process
    that failed (so usage errors still exit 2, interrupts 130), else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # torchrun warns otherwise
    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # its rendezvous and worker-state lines
        logging.getLogger(name).setLevel(logging.ERROR)
    args = parse_args(["--standalone", f"--nproc_per_node={n}", "--module", MODULE, *argv])
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 128 - codes[0] if codes and codes[0] < 0 else 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
