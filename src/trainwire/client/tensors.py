"""Tensors to floats without stalling the training loop.

``loss.item()`` on a GPU waits for every kernel queued before it: logging it each
step serialises the CPU and the GPU. trainwire never calls it on the training
thread. ``Run.log`` keeps a reference; the sender thread, once per flush (never
once per step), stacks all the scalars logged since, per device and dtype, copies
each stack to host memory with ``non_blocking=True`` (pinned, for CUDA), records
one CUDA event, and hands the rows on only once ``event.query()`` says the copy is
done. CPU tensors take the same path, without the event; the suite runs it.

torch is never imported here: a tensor is recognised by its methods, and torch is
taken from ``sys.modules``, where the user's own import put it.

The copy is issued on the sender thread's current stream of each device, the
default stream: a value made on another stream must be synchronised with it by the
user before it is logged (as for any use of a tensor across streams).
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TensorResolver", "is_tensor"]

Row = tuple[int, float, dict[str, Any]]


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return (
        type(value).__module__ == "torch" and hasattr(value, "detach") and hasattr(value, "device")
    )


@dataclass
class _Copy:
    """One stack copied to the host: which (row, key) each element belongs to."""

    host: Any  # a torch tensor on the CPU
    slots: list[tuple[int, str]]
    event: Any  # a torch.cuda.Event, or None when the copy is already done


@dataclass
class _Pending:
    rows: list[Row]
    copies: list[_Copy] = field(default_factory=list)

    def ready(self) -> bool:
        return all(c.event is None or c.event.query() for c in self.copies)


class TensorResolver:
    """Rows in, rows out, in the same order, with every tensor replaced by a float.

    Call :meth:`submit` with the rows drained from the run's queue, then
    :meth:`ready` for the rows whose values have arrived. A tensor that is not one
    number is left in place for the caller's conversion to refuse.
    """

    def __init__(self) -> None:
        self._pending: deque[_Pending] = deque()

    def submit(self, rows: list[Row]) -> None:
        groups: dict[tuple[Any, Any], list[tuple[int, str, Any]]] = {}
        for index, (_, _, values) in enumerate(rows):
            for key, value in values.items():
                kind = type(value)
                if kind is float or kind is int:
                    continue  # most values: no attribute lookups for them
                if is_tensor(value) and value.numel() == 1:
                    groups.setdefault((value.device, value.dtype), []).append((index, key, value))
        pending = _Pending(rows)
        if groups:
            torch = sys.modules["torch"]
            with torch.no_grad():
                for (device, _), members in groups.items():
                    pending.copies.append(_copy(torch, device, members))
        self._pending.append(pending)

    def ready(self, wait: bool = False) -> list[Row]:
        """The rows whose copies are done, oldest first.

        Args:
            wait: block until every copy is done (at finish, not during training).
        """
        out: list[Row] = []
        while self._pending and (wait or self._pending[0].ready()):
            pending = self._pending.popleft()
            for copy in pending.copies:
                if copy.event is not None and wait:
                    copy.event.synchronize()
                for (index, key), number in zip(copy.slots, copy.host.tolist(), strict=True):
                    pending.rows[index][2][key] = number
            out.extend(pending.rows)
        return out

    @property
    def waiting(self) -> int:
        """Rows submitted and not yet handed back."""
        return sum(len(p.rows) for p in self._pending)


def _copy(torch: Any, device: Any, members: list[tuple[int, str, Any]]) -> _Copy:
    # Called under no_grad: the stack records no graph, so no detach() per value.
    stacked = torch.stack([v if v.dim() == 0 else v.reshape(()) for _, _, v in members])
    slots = [(index, key) for index, key, _ in members]
    if device.type != "cuda":
        return _Copy(stacked.cpu(), slots, None)
    # The caching host allocator recycles pinned blocks: no cudaHostAlloc per flush.
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return _Copy(host, slots, event)
