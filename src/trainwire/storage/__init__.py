"""Where metrics are kept. :class:`Store` is the interface the server uses;
:class:`SQLiteStore` is the implementation that ships (PostgreSQL joins later)."""

from __future__ import annotations

from trainwire.storage.base import Commit, RunDeleted, SampledSeries, SeriesSummary, Store
from trainwire.storage.sqlite import SQLiteStore

__all__ = [
    "Commit",
    "RunDeleted",
    "SQLiteStore",
    "SampledSeries",
    "SeriesSummary",
    "Store",
]
