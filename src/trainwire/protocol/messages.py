"""Every message of the trainwire protocol, and how each is encoded.

Trainer <-> server frames are msgpack, decoded by ``msgspec`` into typed, frozen
structs in a single validating pass. Server <-> browser frames are JSON. The full
description, with close codes, is ``docs/protocol.md``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

import msgspec

from trainwire.exceptions import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "DashboardError",
    "DashboardHello",
    "DashboardIn",
    "Finish",
    "FinishStatus",
    "Int64",
    "Seq",
    "UnixTime",
    "Hello",
    "Points",
    "Row",
    "RunInfo",
    "RunSpec",
    "RunStatus",
    "RunUpdate",
    "Runs",
    "Sequenced",
    "Series",
    "ServerToTrainer",
    "Subscribe",
    "TrainerToServer",
    "Unsubscribe",
    "Welcome",
    "decode_dashboard_message",
    "encode_json",
    "json_value",
]

PROTOCOL_VERSION: Final = 1

# Bounds the storage can hold: SQLite integers are signed 64-bit, and a time must be a
# finite number of Unix seconds (SQLite stores NaN as NULL).
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
UnixTime = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]

# One logged step: (step, unix time, {metric key: value}).
Row = tuple[Int64, UnixTime, dict[str, float]]


class RunStatus:
    """The lifecycle states of a run, as they appear on the wire and in storage."""

    RUNNING: Final = "running"
    FINISHED: Final = "finished"
    CRASHED: Final = "crashed"


# How a trainer may end its run; "crashed" is also decided by the server (issue 3).
FinishStatus = Literal["finished", "crashed"]


class RunSpec(msgspec.Struct, frozen=True):
    """What a trainer says about its run. ``id`` is chosen by the client, so that
    re-sending it after a reconnect opens the same run again."""

    id: str
    project: str
    name: str
    config: dict[str, Any] = {}
    # Where the run was started (host, Python, command line, GPUs...): recorded by
    # init(); older clients leave it out.
    env: dict[str, Any] = {}


# -- trainer -> server (msgpack) ---------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello", tag_field="type"):
    """Opens (or re-opens) a run for one writer.

    ``stream`` names this writer's sequence of batches: one per process and run,
    made by the client, so a resumed run or another DDP rank starts a stream of its
    own and never collides with the sequence numbers of another. ``rank`` is set
    when the ranks of a distributed job log into one run: the server files their
    keys under ``rank{N}/``.
    """

    v: int
    run: RunSpec
    stream: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "main"
    rank: Annotated[int, msgspec.Meta(ge=0)] | None = None
    client: str = ""
    # The script asked to continue the run (init(resume=...)): the processes that
    # wrote it before are gone, so their streams with no connection open are set
    # aside, and no longer hold the run "running" or make it "crashed".
    resume: bool = False
    # A run file uploaded by `trainwire sync`: its writer has ended, and does not come
    # back. Its stream, new to a run where another stream has its rank (a later attempt
    # took its place), is set aside at once (a killed attempt's rows, uploaded after the
    # run was resumed, turned the finished run running, then crashed); one the server
    # knows is not revived. A file of a rank no other stream has (an offline job's
    # ranks, synced one by one) is that rank's writer, and ends its part of the run.
    replay: bool = False


class Batch(msgspec.Struct, frozen=True, tag="batch", tag_field="type"):
    seq: Seq
    rows: list[Row]

    @property
    def row_count(self) -> int:
        return len(self.rows)


class Finish(msgspec.Struct, frozen=True, tag="finish", tag_field="type"):
    """The run's last sequenced item: acknowledged like a batch."""

    seq: Seq
    status: FinishStatus = "finished"

    @property
    def row_count(self) -> int:
        return 0


TrainerToServer = Hello | Batch | Finish
# What a client keeps until the server acknowledges it.
Sequenced = Batch | Finish

# -- server -> trainer (msgpack) ---------------------------------------------------


class Welcome(msgspec.Struct, frozen=True, tag="welcome", tag_field="type"):
    """``last_seq``: the highest seq of this stream already stored. ``new_run``: the
    run did not exist before this hello (a resume that names no run: a typo, or
    another server); older servers leave it out."""

    v: int
    run_id: str
    last_seq: int
    new_run: bool = False


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="type", omit_defaults=True):
    """``seq`` is stored. ``refused``: metric keys of that batch (as the writer named
    them) whose values were not stored, because the run already holds the most
    metric keys the server allows; their values are lost, the rest of the batch is
    stored. Older servers never send it, older clients ignore it."""

    seq: int
    refused: list[str] = []


ServerToTrainer = Welcome | Ack

# -- dashboard <-> server (JSON) ---------------------------------------------------


class Subscribe(msgspec.Struct, frozen=True, tag="subscribe", tag_field="type"):
    run: str
    after: Seq = 0


class Unsubscribe(msgspec.Struct, frozen=True, tag="unsubscribe", tag_field="type"):
    run: str


DashboardIn = Subscribe | Unsubscribe


class RunInfo(msgspec.Struct, frozen=True):
    id: str
    project: str
    name: str
    status: str
    created: float
    updated: float
    config: dict[str, Any]
    env: dict[str, Any] = {}


class Series(msgspec.Struct):
    """One metric's points in columns. ``value`` holds floats, or the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` once passed through
    :func:`json_value` (JSON has no spelling for them)."""

    step: list[int]
    time: list[float]
    value: list[float | str]


class DashboardHello(msgspec.Struct, frozen=True, tag="hello", tag_field="type"):
    v: int
    version: str


class Runs(msgspec.Struct, frozen=True, tag="runs", tag_field="type"):
    runs: list[RunInfo]


class RunUpdate(msgspec.Struct, frozen=True, tag="run", tag_field="type"):
    run: RunInfo


class Points(msgspec.Struct, frozen=True, tag="points", tag_field="type"):
    run: str
    seq: int
    series: dict[str, Series]


class DashboardError(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    message: str


_dashboard_decoder: Final[msgspec.json.Decoder[DashboardIn]] = msgspec.json.Decoder(DashboardIn)
_json_encoder: Final = msgspec.json.Encoder()


def decode_dashboard_message(text: str | bytes) -> DashboardIn:
    """Decode one browser frame.

    Raises:
        ProtocolError: the frame is not a known, well-formed message; the reason
            names the offending field, and the connection may stay open.
    """
    try:
        return _dashboard_decoder.decode(text)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad dashboard message: {exc}") from exc
    except RecursionError:
        raise ProtocolError("bad dashboard message: nested too deeply") from None


def encode_json(message: msgspec.Struct) -> bytes:
    """Encode a server -> browser message."""
    return _json_encoder.encode(message)


_NON_FINITE: Final = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_value(value: float) -> float | str:
    """Spell a float for JSON: non-finite values become JavaScript's own spelling."""
    if math.isfinite(value):
        return value
    if value != value:
        return "NaN"
    return _NON_FINITE[value]
