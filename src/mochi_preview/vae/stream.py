"""What the causal decoder carries along time: `StreamState`, and `RankBoundaryState`, its cross-rank variant.

The decoder is causal, so a video fed in successive time chunks gives the same result as the whole video if each
stateful module keeps, between chunks:
* a causal convolution: its last k_t - 1 input frames (the next chunk's front padding instead of replicated frames);
* a causal temporal attention layer: the keys and values of every frame so far;
* a depth-to-space-time layer: whether the video has started (it drops its st - 1 leading frames on the first chunk
  only).
`StreamState` holds exactly that, per module, behind named methods. `RankBoundaryState` is the same state for one
rank's slice of the time axis: what earlier slices would have left is received from the previous rank when (and only
when) a module asks for state it does not hold, and every state the slice sets is sent on to the next rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn


class StreamState:
    """The state one stream of time chunks carries through the decoder's causal modules (see the module docstring).

    A fresh state means "the start of the video". Pass the same object to every chunk of one stream (one spatial
    tile), in time order, and a new one to each other stream.
    """

    def __init__(self) -> None:
        self._conv: dict[nn.Module, torch.Tensor] = {}
        self._attention: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._started: set[nn.Module] = set()

    def conv_frames(self, conv: nn.Module) -> torch.Tensor | None:
        """The last k_t - 1 (padded) input frames `conv` saw, or None before its first chunk."""
        return self._conv.get(conv)

    def set_conv_frames(self, conv: nn.Module, frames: torch.Tensor) -> None:
        self._conv[conv] = frames

    def attention_kv(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of every frame `attention` saw so far, each (N, heads, T, head_dim), or None."""
        return self._attention.get(attention)

    def set_attention_kv(self, attention: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._attention[attention] = (keys, values)

    def started(self, d2st: nn.Module) -> bool:
        """Whether the video has started for `d2st` (it then keeps all its frames)."""
        return d2st in self._started

    def mark_started(self, d2st: nn.Module) -> None:
        self._started.add(d2st)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held (convolution frames, attention keys and values)."""
        yield from self._conv.values()
        for kv in self._attention.values():
            yield from kv

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class Transport(Protocol):
    """Tensors between ranks: `send` may return before the receiver has them, `wait` waits for every send."""

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, src: int) -> torch.Tensor: ...

    def wait(self) -> None: ...


class RankBoundaryState(StreamState):
    """The stream state of one rank's time slice: a slice after the first starts where the previous rank's ends.

    * A module asking for state this object does not hold, with a previous rank (`prev`), receives it from that rank:
      the last frames of its convolution or the keys and values of its attention, as the previous slice left them.
      The first slice (`prev` None) has none: the start of the video. Nothing is received twice.
    * Depth-to-space-time has started on every slice but the first; that needs no message.
    * Every convolution and attention state the slice sets is sent to the next rank (`next`) at once, so the next
      rank can go on while this one computes the layers after it. That is the slice's final state only if each module
      runs once per slice: decode the slice in one call, without stepping (`Decoder.forward(..., step=None)`); a
      second set of one module's state raises.

    `prev` and `next` are global ranks (or None); `transport` moves the tensors (`P2PTransport` between processes).
    Call `finish` once the slice is decoded.
    """

    def __init__(self, prev: int | None, next: int | None, transport: Transport) -> None:
        super().__init__()
        self.prev, self.next, self.transport = prev, next, transport
        self.received = 0  # tensors received so far
        self._set: set[nn.Module] = set()  # modules whose state this slice has set (and sent)

    def conv_frames(self, conv: nn.Module) -> torch.Tensor | None:
        frames = super().conv_frames(conv)
        if frames is None and self.prev is not None:
            frames = self._receive()
            super().set_conv_frames(conv, frames)
        return frames

    def set_conv_frames(self, conv: nn.Module, frames: torch.Tensor) -> None:
        self._check_first_set(conv)
        super().set_conv_frames(conv, frames)
        self._send(frames)

    def attention_kv(self, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        kv = super().attention_kv(attention)
        if kv is None and self.prev is not None:
            kv = self._receive(), self._receive()
            super().set_attention_kv(attention, *kv)
        return kv

    def set_attention_kv(self, attention: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._check_first_set(attention)
        super().set_attention_kv(attention, keys, values)
        self._send(keys)
        self._send(values)

    def started(self, d2st: nn.Module) -> bool:
        return self.prev is not None or super().started(d2st)  # an earlier slice started the video

    def finish(self) -> None:
        """Wait until the next rank has received everything sent to it."""
        self.transport.wait()

    def _check_first_set(self, module: nn.Module) -> None:
        if module in self._set:
            raise RuntimeError(
                f"{type(module).__name__} set its state twice in one slice: a RankBoundaryState sends each state "
                "to the next rank as final, so decode the slice in one call with step=None"
            )
        self._set.add(module)

    def _receive(self) -> torch.Tensor:
        self.received += 1
        return self.transport.recv(self.prev)

    def _send(self, tensor: torch.Tensor) -> None:
        if self.next is not None:
            self.transport.send(tensor, self.next)


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HEADER = 8  # int64 slots: [dtype index, ndim, *shape]


class P2PTransport:
    """torch.distributed point-to-point messages on `device`: a fixed-size header (dtype, shape), then the tensor.

    Sends are asynchronous (isend; buffers kept alive until `wait`), receives block.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        if tensor.ndim > HEADER - 2:
            raise ValueError(f"P2PTransport sends at most {HEADER - 2} dimensions, not {tensor.ndim}")
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        header[: 2 + tensor.ndim] = torch.tensor([DTYPES.index(tensor.dtype), tensor.ndim, *tensor.shape])
        for buf in (header, tensor):
            self.pending.append((dist.isend(buf, dst), buf))

    def recv(self, src: int) -> torch.Tensor:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        dtype, ndim, *shape = header.tolist()
        tensor = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=self.device)
        dist.recv(tensor, src)
        return tensor

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()
