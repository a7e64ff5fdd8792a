"""Where a client keeps sequenced items until the server acknowledges them."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from trainwire.protocol.messages import Sequenced

__all__ = ["MemoryOutbox", "Outbox"]


class Outbox(Protocol):
    """Unacknowledged batches (and the run's finish), oldest first, with contiguous
    sequence numbers. :class:`MemoryOutbox` keeps them in memory; the client's
    spilling outbox moves the overflow to a file."""

    def accepts(self, item: Sequenced) -> bool:
        """Whether ``item`` fits within the outbox's bound."""
        ...

    def append(self, item: Sequenced) -> None: ...

    def items(self, start_seq: int, limit: int) -> list[Sequenced]:
        """Up to ``limit`` items from ``start_seq`` on, in order."""
        ...

    def drop_through(self, seq: int) -> None:
        """Forget every item up to and including ``seq``: the server has it."""
        ...

    @property
    def rows(self) -> int:
        """Rows held."""
        ...

    @property
    def first_seq(self) -> int | None:
        """The oldest item's seq; None when empty."""
        ...

    def __len__(self) -> int: ...


class MemoryOutbox:
    """An :class:`Outbox` in a deque."""

    def __init__(self) -> None:
        self._items: deque[Sequenced] = deque()
        self._rows = 0

    def accepts(self, item: Sequenced) -> bool:
        return True

    def append(self, item: Sequenced) -> None:
        if self._items and item.seq != self._items[-1].seq + 1:
            raise ValueError(f"seq {item.seq} does not follow {self._items[-1].seq}")
        self._items.append(item)
        self._rows += item.row_count

    def items(self, start_seq: int, limit: int) -> list[Sequenced]:
        if not self._items or limit <= 0:
            return []
        # Sequence numbers are contiguous: the position is arithmetic, not a search.
        first = max(0, start_seq - self._items[0].seq)
        last = min(len(self._items), first + limit)
        return [self._items[i] for i in range(first, last)]

    def drop_through(self, seq: int) -> None:
        while self._items and self._items[0].seq <= seq:
            self._rows -= self._items.popleft().row_count

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def first_seq(self) -> int | None:
        return self._items[0].seq if self._items else None

    def __len__(self) -> int:
        return len(self._items)
