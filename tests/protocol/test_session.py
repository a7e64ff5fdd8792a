from __future__ import annotations

import math

import msgspec
import pytest

from trainwire.exceptions import ProtocolError, VersionMismatch
from trainwire.protocol.limits import BATCH_VALUES, MAX_CONFIG_DEPTH, MAX_FRAME_BYTES
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Finish,
    Hello,
    RunSpec,
    Welcome,
)
from trainwire.protocol.outbox import MemoryOutbox
from trainwire.protocol.session import (
    ClientSession,
    ConnectionState,
    ServerSession,
)

SPEC = RunSpec(id="r1", project="p", name="n", config={"lr": 0.1})
enc = msgspec.msgpack.encode


def decode(frames: list[bytes]) -> list[object]:
    return [msgspec.msgpack.decode(f, type=Hello | Batch | Finish | Welcome | Ack) for f in frames]


def open_client(last_seq: int = 0, **kwargs: int) -> ClientSession:
    client = ClientSession(SPEC, **kwargs)
    client.connection_made()
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=last_seq)))
    return client


def test_client_says_hello_first_and_sends_nothing_before_welcome() -> None:
    client = ClientSession(SPEC)
    client.add_rows([(0, 1.0, {"loss": 1.0})])
    assert client.frames_to_send() == []
    hello = msgspec.msgpack.decode(client.connection_made(), type=Hello)
    assert hello.v == PROTOCOL_VERSION and hello.run == SPEC
    assert client.state is ConnectionState.AWAITING_WELCOME
    assert client.frames_to_send() == []


def test_client_cuts_rows_into_numbered_batches() -> None:
    client = open_client(rows_per_batch=2)
    client.add_rows([(i, float(i), {"x": float(i)}) for i in range(5)])
    batches = decode(client.frames_to_send())
    assert [(b.seq, len(b.rows)) for b in batches] == [(1, 2), (2, 2), (3, 1)]  # type: ignore[attr-defined]
    assert client.frames_to_send() == []


def test_client_keeps_batches_until_acked_and_resends_after_reconnect() -> None:
    client = open_client()
    client.add_rows([(0, 0.0, {"x": 0.0})])
    client.frames_to_send()
    client.add_rows([(1, 1.0, {"x": 1.0})])
    client.frames_to_send()
    client.receive_frame(enc(Ack(seq=1)))
    assert client.pending_rows == 1
    client.connection_lost()
    client.connection_made()
    assert client.frames_to_send() == []
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=1)))
    assert [b.seq for b in decode(client.frames_to_send())] == [2]  # type: ignore[attr-defined]


def test_client_drops_what_the_welcome_says_is_stored() -> None:
    client = open_client(rows_per_batch=1)
    client.add_rows([(i, 0.0, {"x": 0.0}) for i in range(3)])
    client.frames_to_send()
    client.connection_lost()
    client.connection_made()
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=1)))
    assert [b.seq for b in decode(client.frames_to_send())] == [2, 3]  # type: ignore[attr-defined]


def test_a_session_over_a_stored_outbox_sends_its_items_then_continues_numbering() -> None:
    outbox = MemoryOutbox()
    for seq in (5, 6):
        outbox.append(Batch(seq=seq, rows=[(seq, 0.0, {"x": 1.0})]))
    client = ClientSession(SPEC, stream="s1", outbox=outbox, next_seq=7)
    assert client.acked_seq == 4
    client.connection_made()
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=5)))
    client.add_rows([(7, 0.0, {"x": 1.0})])
    assert [b.seq for b in decode(client.frames_to_send())] == [6, 7]  # type: ignore[attr-defined]


def test_rows_are_cut_into_batches_while_disconnected_and_sent_once_welcomed() -> None:
    client = ClientSession(SPEC, rows_per_batch=1)
    client.add_rows([(i, 0.0, {"x": 1.0}) for i in range(3)])
    client.cut_batches()
    assert len(client.outbox) == 3 and client.frames_to_send() == []
    client.connection_made()
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=0)))
    assert [b.seq for b in decode(client.frames_to_send())] == [1, 2, 3]  # type: ignore[attr-defined]


def test_at_most_a_window_of_items_is_in_flight() -> None:
    client = open_client(rows_per_batch=1, window=2)
    client.add_rows([(i, 0.0, {"x": 1.0}) for i in range(5)])
    assert [b.seq for b in decode(client.frames_to_send())] == [1, 2]  # type: ignore[attr-defined]
    assert client.frames_to_send() == []
    client.receive_frame(enc(Ack(seq=1)))
    assert [b.seq for b in decode(client.frames_to_send())] == [3]  # type: ignore[attr-defined]
    client.receive_frame(enc(Ack(seq=3)))
    assert [b.seq for b in decode(client.frames_to_send())] == [4, 5]  # type: ignore[attr-defined]
    client.receive_frame(enc(Ack(seq=5)))
    assert client.delivered and client.pending_rows == 0


def test_hello_names_the_stream_and_rank() -> None:
    hello = msgspec.msgpack.decode(
        ClientSession(SPEC, stream="abc", rank=3).connection_made(), type=Hello
    )
    assert (hello.stream, hello.rank) == ("abc", 3)


def test_finish_is_sequenced_after_every_row_and_done_once_acked() -> None:
    client = open_client()
    client.add_rows([(0, 0.0, {"x": 0.0})])
    client.finish()
    client.finish()
    frames = decode(client.frames_to_send())
    assert frames == [Batch(seq=1, rows=[(0, 0.0, {"x": 0.0})]), Finish(seq=2)]
    assert not client.done and client.finishing
    client.receive_frame(enc(Ack(seq=2)))
    assert client.done and client.pending_rows == 0
    with pytest.raises(ProtocolError):
        client.add_rows([(1, 0.0, {"x": 0.0})])


def test_client_rejects_another_protocol_version_and_garbage() -> None:
    client = ClientSession(SPEC)
    client.connection_made()
    with pytest.raises(VersionMismatch):
        client.receive_frame(enc(Welcome(v=99, run_id="r1", last_seq=0)))
    with pytest.raises(ProtocolError):
        client.receive_frame(b"\xc1")
    with pytest.raises(ProtocolError, match="ack before welcome"):
        ClientSession(SPEC).receive_frame(enc(Ack(seq=1)))


def test_drop_oldest_pending_forgets_only_unbatched_rows() -> None:
    client = ClientSession(SPEC)
    client.add_rows([(i, 0.0, {"x": 0.0}) for i in range(5)])
    assert client.drop_oldest_pending(3) == 3
    assert client.drop_oldest_pending(9) == 2
    assert client.pending_rows == 0


def test_server_welcomes_then_acks_after_commit_only() -> None:
    server = ServerSession()
    message = server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    assert message == Hello(v=PROTOCOL_VERSION, run=SPEC)
    assert server.frames_to_send() == []
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), last_seq=0)
    assert decode(server.frames_to_send()) == [Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=0)]
    batch = Batch(seq=1, rows=[(0, 1.0, {"loss": math.inf})])
    assert server.receive_frame(enc(batch)) == batch
    assert server.frames_to_send() == []  # nothing until the caller has committed
    server.committed(1)
    assert decode(server.frames_to_send()) == [Ack(seq=1)]


def test_server_acks_a_duplicate_without_asking_to_store_it() -> None:
    server = ServerSession()
    server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), last_seq=3)
    server.frames_to_send()
    assert server.receive_frame(enc(Batch(seq=2, rows=[]))) is None
    assert decode(server.frames_to_send()) == [Ack(seq=2)]


def test_server_names_the_keys_left_out_of_a_batch_in_its_ack() -> None:
    server = ServerSession()
    server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), last_seq=0)
    server.frames_to_send()
    server.receive_frame(enc(Batch(seq=1, rows=[(0, 1.0, {"b": 1.0, "a": 2.0, "c": 3.0})])))
    server.committed(1, refused=("c", "b"))
    assert decode(server.frames_to_send()) == [Ack(seq=1, refused=["b", "c"])]
    # An ack that leaves nothing out is the older protocol's ack, byte for byte.
    server.committed(2)
    assert server.frames_to_send() == [enc({"type": "ack", "seq": 2})]


def test_server_refuses_a_batch_of_more_keys_than_any_client_sends() -> None:
    """Keys past the run's limit no longer close the connection, so nothing but this
    bounds the keys of a batch: a 16 MiB frame of a million distinct keys held the
    store's lock, which every trainer and dashboard waits for, for seconds (and was
    answered with an ack naming them all). A Python client sends at most BATCH_VALUES
    values in a batch, or one row of its own at most 10,000 keys."""
    server = ServerSession(max_known_keys=10)
    server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), last_seq=0)
    fits = {f"k{i}": 1.0 for i in range(BATCH_VALUES)}
    assert server.receive_frame(enc(Batch(seq=1, rows=[(0, 1.0, fits)]))) is not None
    server.committed(1)
    # Over several rows, the same keys count once.
    rows = [(s, 1.0, {f"n{i}": 1.0 for i in range(BATCH_VALUES // 2)}) for s in range(4)]
    assert server.receive_frame(enc(Batch(seq=2, rows=rows))) is not None
    server.committed(2)
    too_many = {f"x{i}": 1.0 for i in range(BATCH_VALUES + 1)}
    with pytest.raises(ProtocolError, match="metric keys") as err:
        server.receive_frame(enc(Batch(seq=3, rows=[(1, 1.0, too_many)])))
    assert err.value.code == 1008
    # The same on a fresh connection, with room to remember the run's 10,000 keys.
    fresh = ServerSession()
    fresh.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    fresh.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), last_seq=0)
    with pytest.raises(ProtocolError, match=f"more than {BATCH_VALUES} new metric keys"):
        fresh.receive_frame(enc(Batch(seq=1, rows=[(1, 1.0, too_many)])))


def test_client_counts_the_values_the_server_left_out_and_remembers_their_keys() -> None:
    client = open_client(rows_per_batch=2)
    client.add_rows(
        [(0, 1.0, {"a": 1.0, "new": 2.0}), (1, 2.0, {"new": 3.0}), (2, 3.0, {"a": 4.0})]
    )
    assert len(client.frames_to_send()) == 2
    client.receive_frame(enc(Ack(seq=1, refused=["new"])))
    assert (client.refused_keys, client.refused_values) == ({"new"}, 2)
    client.receive_frame(enc(Ack(seq=2)))
    assert client.refused_values == 2 and client.delivered
    # A late ack of a batch already acknowledged (dropped) counts nothing twice.
    client.receive_frame(enc(Ack(seq=1, refused=["new"])))
    assert client.refused_values == 2


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (enc(Hello(v=2, run=SPEC)), 4001, "unsupported protocol version 2; this server speaks 1"),
        (b"\x93\x01", 1003, "malformed frame"),
        (enc({"type": "launch", "seq": 1}), 1003, "malformed frame"),
        (enc(Batch(seq=1, rows=[])), 1008, "batch before hello"),
        (enc(Finish(seq=1)), 1008, "finish before hello"),
    ],
)
def test_server_refuses_bad_frames_with_a_close_code_and_reason(
    frame: bytes, code: int, reason: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        ServerSession().receive_frame(frame)
    assert info.value.code == code
    assert info.value.reason.startswith(reason)


def test_server_refuses_a_non_numeric_value_naming_where_it_is() -> None:
    server = ServerSession()
    server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), 0)
    bad = enc({"type": "batch", "seq": 1, "rows": [[0, 0.0, {"loss": "high"}]]})
    with pytest.raises(ProtocolError, match=r"Expected `float`, got `str` - at `\$.rows\[0\]"):
        server.receive_frame(bad)


def test_a_hello_from_a_client_that_knows_no_env_is_welcome() -> None:
    older = {
        "type": "hello",
        "v": PROTOCOL_VERSION,
        "run": {"id": "r", "project": "p", "name": "n"},
    }
    hello = ServerSession().receive_frame(enc(older))
    assert isinstance(hello, Hello) and hello.run.env == {} and hello.run.config == {}


@pytest.mark.parametrize("field", ["config", "env"])
def test_config_and_env_must_be_json_like_to_be_stored(field: str) -> None:
    # A nil map key: msgpack has room for it, JSON (what storage keeps) has none.
    run = {"id": "r", "project": "p", "name": "n", field: {"gpus": {None: "H100"}}}
    with pytest.raises(ProtocolError, match=f"{field} must be JSON-like") as info:
        ServerSession().receive_frame(enc({"type": "hello", "v": PROTOCOL_VERSION, "run": run}))
    assert info.value.code == 1003


@pytest.mark.parametrize("field", ["config", "env"])
def test_config_and_env_may_nest_32_levels_and_no_more(field: str) -> None:
    def hello(levels: int) -> bytes:
        value: object = 1.0
        for level in range(levels - 1):  # the map itself is the first level
            value = [value] if level % 2 else {"k": value}
        run = {"id": "r", "project": "p", "name": "n", field: {"k": value}}
        return enc({"type": "hello", "v": PROTOCOL_VERSION, "run": run})

    assert isinstance(ServerSession().receive_frame(hello(MAX_CONFIG_DEPTH)), Hello)
    with pytest.raises(ProtocolError) as info:
        ServerSession().receive_frame(hello(MAX_CONFIG_DEPTH + 1))
    assert (info.value.code, info.value.reason) == (1003, f"{field} nested deeper than 32 levels")


@pytest.mark.parametrize("run_id", ["", "..", "sweep/lr-0.1", "a\\b", "tab\there", "x" * 256])
def test_server_refuses_a_run_id_no_route_could_name(run_id: str) -> None:
    """Clients other than ours (or older ones) may send any id: "sweep/lr-0.1" was
    stored, and no REST route or dashboard page could reach it."""
    run = {"id": run_id, "project": "p", "name": "n"}
    with pytest.raises(ProtocolError, match="run id") as info:
        ServerSession().receive_frame(enc({"type": "hello", "v": PROTOCOL_VERSION, "run": run}))
    assert info.value.code == 1003
    run["id"] = "sweep-lr-0.1 (é)"
    assert isinstance(
        ServerSession().receive_frame(enc({"type": "hello", "v": PROTOCOL_VERSION, "run": run})),
        Hello,
    )


def test_server_refuses_a_second_hello_and_seq_zero() -> None:
    server = ServerSession()
    server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    server.run_opened(Hello(v=PROTOCOL_VERSION, run=SPEC), 0)
    with pytest.raises(ProtocolError, match="hello sent twice"):
        server.receive_frame(enc(Hello(v=PROTOCOL_VERSION, run=SPEC)))
    with pytest.raises(ProtocolError, match="start at 1"):
        server.receive_frame(enc(Batch(seq=0, rows=[])))


def test_close_reasons_fit_in_a_close_frame() -> None:
    error = ProtocolError("x" * 500)
    assert len(error.reason.encode()) <= 123


def test_client_and_server_sessions_deliver_everything_exactly_once_across_drops() -> None:
    """Pump both cores against each other, losing the connection every few frames."""
    client = ClientSession(SPEC, rows_per_batch=3)
    stored: dict[int, list[int]] = {}
    last_seq = 0
    for round_ in range(6):
        client.add_rows([(round_ * 10 + i, 0.0, {"x": 1.0}) for i in range(7)])
        server = ServerSession()
        hello = server.receive_frame(client.connection_made())
        assert isinstance(hello, Hello)
        server.run_opened(hello, last_seq)
        for frame in server.frames_to_send():
            client.receive_frame(frame)
        frames = client.frames_to_send()
        # Deliver only some of the frames, and only some of the acks, then drop.
        for frame in frames[: round_ % 3 + 1]:
            message = server.receive_frame(frame)
            if isinstance(message, Batch):
                stored[message.seq] = [row[0] for row in message.rows]
                last_seq = message.seq
                server.committed(message.seq)
        for frame in server.frames_to_send()[:1]:
            client.receive_frame(frame)
        client.connection_lost()
    client.finish()
    server = ServerSession()
    hello = server.receive_frame(client.connection_made())
    assert isinstance(hello, Hello)
    server.run_opened(hello, last_seq)
    for frame in server.frames_to_send():
        client.receive_frame(frame)
    for frame in client.frames_to_send():
        message = server.receive_frame(frame)
        if isinstance(message, Batch):
            stored[message.seq] = [row[0] for row in message.rows]
        if message is not None:
            server.committed(message.seq)  # type: ignore[union-attr]
    for frame in server.frames_to_send():
        client.receive_frame(frame)
    steps = [step for seq in sorted(stored) for step in stored[seq]]
    assert steps == [r * 10 + i for r in range(6) for i in range(7)]
    assert client.done


def test_client_awaits_the_server_only_for_its_welcome_or_a_backlog() -> None:
    client = ClientSession(SPEC, rows_per_batch=1, window=1)
    client.connection_made()
    assert client.awaiting_server  # no welcome yet
    client.receive_frame(enc(Welcome(v=PROTOCOL_VERSION, run_id="r1", last_seq=0)))
    assert not client.awaiting_server
    client.add_rows([(i, float(i), {"x": float(i)}) for i in range(2)])
    assert len(client.frames_to_send()) == 1  # the window holds one
    assert client.awaiting_server  # batch 2 waits for the ack of batch 1
    client.receive_frame(enc(Ack(seq=1)))
    assert len(client.frames_to_send()) == 1
    assert not client.awaiting_server  # sent everything; its ack can wait for a flush


class FullDiskOutbox(MemoryOutbox):
    """An outbox whose writes fail until ``full`` is cleared, as a spill file's do on
    a full disk."""

    full = True

    def append(self, item: Batch | Finish) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        super().append(item)


def test_rows_an_outbox_fails_to_take_stay_queued_for_the_next_cut() -> None:
    outbox = FullDiskOutbox()
    session = ClientSession(SPEC, outbox=outbox, rows_per_batch=2)
    session.add_rows([(i, 1.0, {"x": float(i)}) for i in range(3)])
    with pytest.raises(OSError):
        session.cut_batches()
    assert session.queued_rows == 3 and session.next_seq == 1
    outbox.full = False
    assert session.cut_batches()
    items = outbox.items(1, 10)
    assert [item.seq for item in items] == [1, 2]
    assert [row[0] for item in items for row in item.rows] == [0, 1, 2]


def test_the_newest_queued_rows_are_dropped_first() -> None:
    session = ClientSession(SPEC)
    session.add_rows([(i, 1.0, {"x": float(i)}) for i in range(5)])
    assert session.drop_newest_pending(2) == 2
    session.cut_batches()
    assert [row[0] for item in session.outbox.items(1, 10) for row in item.rows] == [0, 1, 2]
    assert session.drop_newest_pending(10) == 0


def test_batches_are_cut_by_values_too_so_that_no_frame_outgrows_the_server() -> None:
    """Rows of many long keys: by rows alone, 1000 of them would make a frame the
    server refuses at every resend. A row over the bound still goes, alone."""
    session = ClientSession(SPEC)
    wide = {f"{i:0199d}": 1.0 for i in range(5000)}
    session.add_rows([(step, 1.0, wide) for step in range(10)])
    session.add_rows([(10, 1.0, {f"{i:0199d}": 1.0 for i in range(BATCH_VALUES + 1)})])
    session.cut_batches()
    items = session.outbox.items(1, 100)
    sizes = [len(item.rows) for item in items if isinstance(item, Batch)]
    assert sizes == [3, 3, 3, 1, 1]
    assert max(len(enc(item)) for item in items[:-1]) < 4 * 1024 * 1024 < MAX_FRAME_BYTES
    assert [row[0] for item in items for row in item.rows] == list(range(11))
