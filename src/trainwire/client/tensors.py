"""Tensors to floats without stalling the training loop.

``loss.item()`` on a GPU waits for every kernel queued before it: logging it each
step serialises the CPU and the GPU. trainwire never calls it on the training
thread for a tensor on an accelerator. ``Run.log`` keeps a reference; the sender
thread, once per flush (never once per step), stacks all the scalars logged since,
per device and dtype, copies each stack to host memory with ``non_blocking=True``
(pinned, for CUDA), records one CUDA event, and hands the rows on only once
``event.query()`` says the copy is done. CPU tensors can take the same path,
without the event (the suite runs it), but ``Run.log`` reads them at once instead
(:func:`read_cpu_scalars`): a CPU value is already computed, so ``.item()`` waits
for nothing and costs the loop about 0.35 µs, far less than what the sender paid
for the tensor later under the GIL (grouping, stacking, and freeing the autograd
graph the reference kept alive: about 10 µs a value, measured on a 2-vCPU VM).

torch is never imported here: a tensor is recognised by its methods, and torch is
taken from ``sys.modules``, where the user's own import put it.

The copy is issued on the sender thread's current stream of each device, the
default stream: a value made on another stream must be synchronised with it by the
user before it is logged (as for any use of a tensor across streams).

Being read later, a tensor changed in place after ``log()`` (a parameter the
optimizer steps, an accumulator zeroed) would be logged with its new value. A copy
per call would cost an allocation and a kernel launch every step, so ``log()``
notes the tensor's version counter instead (:class:`Logged`), and the sender drops
a value whose tensor changed by the time its copy was queued, and says so: silently
wrong numbers are worse than a missing point. The counter is read once the copy is
queued: a change queued after the copy cannot reach it (the stream runs kernels in
order), and one queued before shows in the counter.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["Logged", "TensorResolver", "flatten", "is_tensor", "read_cpu_scalars"]

Row = tuple[int, float, dict[str, Any]]


def is_tensor(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return (
        type(value).__module__ == "torch" and hasattr(value, "detach") and hasattr(value, "device")
    )


class Logged:
    """A tensor on an accelerator as ``log()`` saw it: the tensor, and its version
    counter then (None for an inference tensor, which keeps none)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor
        try:
            self.version: int | None = tensor._version
        except RuntimeError:  # "Inference tensors do not track version counter"
            self.version = None

    @property
    def changed(self) -> bool:
        """Changed in place since ``log()``: its value then is gone."""
        return self.version is not None and self.tensor._version != self.version


# Classes already recognised as torch tensors: one set lookup per value instead of
# is_tensor's three attribute lookups (one of which builds a device object), 0.4 µs.
_tensor_types: set[type] = set()


def read_cpu_scalars(values: dict[Any, Any], *, maps: bool = True) -> bool:
    """Replace, in place, each one-number CPU tensor in ``values`` by its number.

    Runs on the training thread, in ``log()``: Python numbers cost one type check;
    a tensor on any other device, or one ``.item()`` refuses, is left for the sender.
    Nested maps are flattened first (:func:`flatten`), unless ``maps`` is False.

    Returns:
        True if every value is now a float and every key a str: a row the sender
        can send as it is.
    """
    plain = True
    nested = False
    for key, value in values.items():
        if type(key) is not str:
            plain = False
        kind = type(value)
        if kind is float:
            continue
        if kind not in _tensor_types:
            if not is_tensor(value):
                plain = False  # an int, a numpy scalar, ...: the sender converts it
                # Only here, past the numbers' checks: an ABC check costs ~0.1 µs.
                nested = nested or (maps and kind is not int and isinstance(value, Mapping))
                continue
            _tensor_types.add(kind)
        if value.is_cpu:
            try:
                value = values[key] = value.item()  # never a sync: a CPU value is computed
            except Exception:  # noqa: BLE001 - not one number: the sender refuses it
                plain = False
                continue
            if type(value) is not float:  # an integer tensor's int
                plain = False
        else:
            plain = False  # a GPU tensor: the sender reads it once its copy is done
            values[key] = Logged(value)
    if nested:
        flat = flatten(values)
        values.clear()
        values.update(flat)
        return read_cpu_scalars(values, maps=False)  # maps nested too deep stay
    return plain


MAX_NESTING: Final = 8  # deeper maps stay maps, and are dropped as no number


def flatten(values: Mapping[Any, Any], prefix: str = "", depth: int = 1) -> dict[Any, Any]:
    """``{"train": {"loss": x}}`` as ``{"train/loss": x}``: "/" is the dashboard's
    group separator, and what wandb's users log nested. Copied here, in ``log()``,
    since the caller may reuse its dicts once ``log()`` returns; top-level keys are
    kept as they are (the sender names them)."""
    flat: dict[Any, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping) and depth < MAX_NESTING and not is_tensor(value):
            flat.update(flatten(value, str(name), depth + 1))
        else:
            flat[name] = value
    return flat


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
    # (row, key) of values whose tensors changed in place after log(): dropped.
    stale: list[tuple[int, str]] = field(default_factory=list)

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
        # Keys whose values were dropped, changed in place after log(): the caller
        # counts and reports them (take_changed).
        self._changed: list[str] = []

    def take_changed(self) -> list[str]:
        """The keys of values dropped from the rows handed back since the last call:
        their tensors changed in place between ``log()`` and their copy."""
        changed, self._changed = self._changed, []
        return changed

    def submit(self, rows: list[Row]) -> None:
        groups: dict[tuple[Any, Any], list[tuple[int, str, Any]]] = {}
        logged: list[tuple[int, str, Logged]] = []
        for index, (_, _, values) in enumerate(rows):
            for key, value in values.items():
                kind = type(value)
                if kind is float or kind is int:
                    continue  # most values: no attribute lookups for them
                if kind is Logged:
                    logged.append((index, key, value))
                    value = values[key] = value.tensor
                if is_tensor(value) and value.numel() == 1:
                    groups.setdefault((value.device, value.dtype), []).append((index, key, value))
        pending = _Pending(rows)
        if groups:
            torch = sys.modules["torch"]
            with torch.no_grad():
                for (device, _), members in groups.items():
                    try:
                        pending.copies.append(_copy(torch, device, members))
                    except Exception:  # noqa: BLE001 - see below
                        # A group the sender cannot copy (a meta or sparse tensor, a
                        # device error): its values stay as they are, for the caller's
                        # conversion to read or refuse one by one. Raised, it lost
                        # every row drained with them.
                        continue
        # Read once the copies are queued (see the module's docstring).
        pending.stale = [(index, key) for index, key, value in logged if value.changed]
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
            for index, key in pending.stale:
                del pending.rows[index][2][key]
                self._changed.append(key)
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
