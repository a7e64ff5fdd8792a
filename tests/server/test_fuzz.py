"""Bad input, property-based: random and mutated frames at both WebSocket endpoints.

A trainer that sends junk gets a protocol reply or a close with a documented code and
a short reason; a dashboard that sends junk gets an ``error`` message and keeps its
connection. Afterwards a well-behaved client is still served, and what was stored
before is intact.

The server bugs this file found (strings that are not UTF-8, deep nesting, integers
beyond int64, NaN times, config maps with non-string keys, huge ``after`` values) are
fixed; one regression test each stands at the bottom.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import uuid
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
from fastapi.testclient import TestClient
from hypothesis import (
    HealthCheck,
    currently_in_test_context,
    event,
    given,
    settings,
    strategies as st,
)
from starlette.testclient import WebSocketTestSession

from tests.server.conftest import ADMIN_TOKEN, app_settings
from trainwire.exceptions import ProtocolError
from trainwire.protocol.limits import run_id_problem
from trainwire.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    DashboardIn,
    Finish,
    Hello,
    RunSpec,
    ServerToTrainer,
    Subscribe,
    TrainerToServer,
    Unsubscribe,
    Welcome,
    decode_dashboard_message,
)
from trainwire.server.app import create_app

# The examples open runs far faster than any trainer: lift that one limit.
SETTINGS_LIMITS: Final = {"max_new_runs_per_minute": 1_000_000}
MAX_FRAME_BYTES: Final = app_settings(Path(), **SETTINGS_LIMITS).limits.max_frame_bytes
# Close codes docs/protocol.md allows for a trainer's bad frame; never 1011.
TRAINER_CLOSE_CODES: Final = {1003, 1008, 1009, 4001}
# RFC 6455 section 5.5: a close frame's payload is at most 125 bytes, 2 of them the code.
MAX_REASON_BYTES: Final = 123
# How long to wait for an answer the protocol promises. Starlette's TestClient waits
# forever, so a server that goes silent would otherwise hang the suite.
ANSWER_TIMEOUT_S: Final = 10.0
INT64_MAX: Final = 2**63 - 1

# The run of the well-behaved clients. No fuzzed frame may name it (see
# _known_trainer_bug): run ids are the client's to choose, so a frame naming it could
# legitimately add points to it.
GOOD: Final = RunSpec(id="well-behaved-run", project="fuzz", name="good")
FUZZ: Final = RunSpec(id="fuzz", project="fuzz", name="junk", config={"lr": 0.1, "dims": [8, 8]})

FUZZ_SETTINGS: Final = settings(
    max_examples=150,
    deadline=None,
    # One app per test, shared by its examples, for speed: the examples only add runs
    # that the checks ignore. And some frames are 64 KiB, slow to generate.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

Frame = bytes | str  # str is sent as a text frame
Message = MutableMapping[str, Any]  # an ASGI message

_trainer_decoder: Final[msgspec.msgpack.Decoder[TrainerToServer]] = msgspec.msgpack.Decoder(
    TrainerToServer
)
_server_decoder: Final[msgspec.msgpack.Decoder[ServerToTrainer]] = msgspec.msgpack.Decoder(
    ServerToTrainer
)


# -- what the fuzz must not send ------------------------------------------------------


def _known_trainer_bug(frame: Frame) -> str | None:
    """Why ``frame`` must not be sent, or None. Only one reason is left: run ids are
    the client's to choose, so a frame naming the well-behaved run could rightly
    change it, and the health check after each example would then fail."""
    if isinstance(frame, str) or len(frame) > MAX_FRAME_BYTES:
        return None
    try:
        message = _trainer_decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(message, Hello) and message.run.id == GOOD.id:
        return "names the well-behaved run"
    return None


# -- talking to the app ---------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The app in-process, as tests/server/conftest.py makes it, save for SETTINGS_LIMITS."""
    app = create_app(app_settings(tmp_path, **SETTINGS_LIMITS))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as test_client:
        yield test_client


def receive_within(ws: WebSocketTestSession, timeout: float = ANSWER_TIMEOUT_S) -> Message:
    """The next ASGI message the app sent, failing the test if none comes in time."""
    box: list[Message | BaseException] = []

    def receive() -> None:
        try:
            box.append(ws.receive())
        except BaseException as exc:  # handed to the test's thread below
            box.append(exc)

    # A thread of its own, because the wait cannot be cut short: on a timeout the test
    # fails, and the thread ends when the socket is closed on the way out.
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        raise AssertionError(f"no answer within {timeout} s")
    result = box[0]
    if isinstance(result, BaseException):
        raise result
    return result


def note(what: str) -> None:
    """Count ``what`` in Hypothesis's statistics; the checks also run outside @given."""
    if currently_in_test_context():
        event(what)


def decode_trainer_frame(frame: bytes) -> TrainerToServer | None:
    """The message in ``frame``, or None if it is not a valid trainer frame."""
    try:
        message: TrainerToServer = _trainer_decoder.decode(frame)
    # Not only DecodeError: see BUG_NOT_UTF8 and BUG_DEEP_NESTING.
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return message


def decode_dashboard_frame(frame: Frame) -> DashboardIn | None:
    """The message in ``frame``, or None if it is not a valid dashboard message (one
    naming a run id no run can have included: the server answers it with an error)."""
    if isinstance(frame, bytes):
        return None
    try:
        message = decode_dashboard_message(frame)
    except (ProtocolError, RecursionError):  # RecursionError: see BUG_DEEP_NESTING
        return None
    return None if run_id_problem(message.run) is not None else message


def send_frame(ws: WebSocketTestSession, frame: Frame) -> None:
    if isinstance(frame, str):
        ws.send_text(frame)
    else:
        ws.send_bytes(frame)


def receive_json(ws: WebSocketTestSession, timeout: float = ANSWER_TIMEOUT_S) -> Any:
    message = receive_within(ws, timeout)
    assert message["type"] == "websocket.send", message
    assert message.get("text") is not None, "dashboard frames must be text"
    return json.loads(message["text"])


def receive_answer(dash: WebSocketTestSession, timeout: float = ANSWER_TIMEOUT_S) -> Any:
    """The next dashboard frame that is not a ``run`` update: those are pushed whenever
    a run changes (the server marks the good run crashed after a minute without its
    trainer), not in answer to anything."""
    while (frame := receive_json(dash, timeout))["type"] == "run":
        pass
    return frame


class WellBehavedTrainer:
    """Logs to the good run throughout a test, and checks every point is stored."""

    def __init__(self, client: TestClient, ws: WebSocketTestSession) -> None:
        self.client = client
        self.ws = ws
        self.seq = 0
        self.stored: dict[str, list[Any]] = {"step": [], "time": [], "value": []}

    def logs_a_batch_and_finds_everything_stored(self) -> None:
        self.seq += 1
        step, time, value = self.seq, 1000.0 + self.seq, 1.0 / self.seq
        self.ws.send_bytes(msgspec.msgpack.encode(Batch(self.seq, [(step, time, {"x": value})])))
        message = receive_within(self.ws)
        assert message["type"] == "websocket.send", message
        assert _server_decoder.decode(message["bytes"]) == Ack(seq=self.seq)
        for column, item in zip(self.stored.values(), (step, time, value), strict=True):
            column.append(item)
        response = self.client.get(f"/api/runs/{GOOD.id}/metrics")
        assert response.status_code == 200
        assert response.json()["series"] == {"x": {**self.stored, "sampled": False}}


@pytest.fixture
def good_trainer(client: TestClient) -> Iterator[WellBehavedTrainer]:
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_bytes(msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=GOOD)))
        message = receive_within(ws)
        assert _server_decoder.decode(message["bytes"]) == Welcome(
            v=PROTOCOL_VERSION, run_id=GOOD.id, last_seq=0, new_run=True
        )
        trainer = WellBehavedTrainer(client, ws)
        trainer.logs_a_batch_and_finds_everything_stored()
        yield trainer


@pytest.fixture
def good_run(client: TestClient) -> dict[str, Any]:
    """The good run, with a few points (NaN and ±Infinity among them): its metrics
    as the REST API shows them."""
    values = [0.5, math.nan, math.inf, -math.inf, -0.0, 1e300]
    with client.websocket_connect("/ws/ingest") as ws:
        ws.send_bytes(msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=GOOD)))
        assert isinstance(_server_decoder.decode(receive_within(ws)["bytes"]), Welcome)
        for seq, value in enumerate(values, start=1):
            rows = [(seq, float(seq), {"loss": value, "acc": float(seq)})]
            ws.send_bytes(msgspec.msgpack.encode(Batch(seq=seq, rows=rows)))
            assert _server_decoder.decode(receive_within(ws)["bytes"]) == Ack(seq=seq)
    metrics: dict[str, Any] = {
        key: {column: values for column, values in series.items() if column != "sampled"}
        for key, series in client.get(f"/api/runs/{GOOD.id}/metrics").json()["series"].items()
    }
    assert metrics["loss"]["value"] == [0.5, "NaN", "Infinity", "-Infinity", -0.0, 1e300]
    return metrics


# -- what a trainer may be answered -------------------------------------------------


def check_trainer_answers(client: TestClient, frames: list[Frame], *, greet: bool) -> None:
    """Send ``frames`` on a fresh trainer connection (after a valid ``hello`` if
    ``greet``), checking that each gets the reply it asks for or a clear close."""
    with client.websocket_connect("/ws/ingest") as ws:
        greeted = False
        if greet:
            ws.send_bytes(msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=FUZZ)))
            reply = _server_decoder.decode(receive_within(ws)["bytes"])
            assert isinstance(reply, Welcome) and reply.run_id == FUZZ.id
            greeted = True
        for frame in frames:
            send_frame(ws, frame)
            message = receive_within(ws)
            if message["type"] == "websocket.close":
                check_trainer_close(frame, message, greeted=greeted)
                return
            assert message["type"] == "websocket.send", message
            assert message.get("bytes") is not None, "trainer frames must be binary"
            reply = _server_decoder.decode(message["bytes"])  # a valid protocol frame
            assert isinstance(frame, bytes), f"text frame {frame!r} answered with {reply}"
            match decode_trainer_frame(frame):  # only a valid frame gets a reply
                case Hello(run=run):
                    assert isinstance(reply, Welcome), reply
                    assert (reply.v, reply.run_id) == (PROTOCOL_VERSION, run.id), reply
                    note("trainer: welcomed")
                    greeted = True
                case Batch(seq=seq) | Finish(seq=seq):
                    assert greeted and reply == Ack(seq=seq), reply
                    note("trainer: acked")
                case None:
                    raise AssertionError(f"malformed frame {frame!r} answered with {reply}")


def check_trainer_close(frame: Frame, message: Message, *, greeted: bool) -> None:
    code, reason = message.get("code", 1000), message.get("reason") or ""
    note(f"trainer: closed {code}")
    assert code in TRAINER_CLOSE_CODES, f"closed with {code} {reason!r}"
    assert reason, f"closed with {code} and no reason"
    assert len(reason.encode()) <= MAX_REASON_BYTES, reason
    if isinstance(frame, str):
        assert code == 1003
        return
    if len(frame) > MAX_FRAME_BYTES:
        assert code == 1009
        return
    decoded = decode_trainer_frame(frame)
    if decoded is None:
        assert code == 1003, f"a malformed frame closed with {code} {reason!r}"
        return
    if isinstance(decoded, Batch | Finish) and not greeted:
        assert code == 1008, f"a {type(decoded).__name__} before hello closed with {code}"


# -- trainer frame strategies ---------------------------------------------------------

msgpack_ints = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, -1, 2, 2**31, 2**32, 2**53 + 1, INT64_MAX, 2**63, 2**64 - 1, -(2**63)]),
)
long_text = st.builds(
    lambda piece, times: piece * times, st.text(min_size=1, max_size=3), st.integers(50, 3000)
)
short_text = st.text(max_size=12)
msgpack_scalars = st.one_of(
    st.none(),
    st.booleans(),
    msgpack_ints,
    st.floats(),  # NaN and ±Infinity too: msgpack carries them
    short_text,
    st.binary(max_size=12),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
)
msgpack_keys = st.one_of(
    short_text, st.integers(-5, 5), st.binary(max_size=4), st.tuples(st.integers(0, 3))
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(msgpack_keys, inner, max_size=4)
    ),
    max_leaves=12,
)
# Keys the server takes (printable, 1 to 200 characters) more often than not, so that
# batches reach storage; and the floats that storage may mishandle, often.
good_keys = st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=24)
metric_keys = st.one_of(good_keys, good_keys, short_text, long_text)
special_floats = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.8e308])
floats = st.one_of(st.floats(), special_floats)
metric_values = st.one_of(floats, st.integers(-(2**63), 2**64 - 1))
# Mostly small and in order, so that frames get past the decoder to the checks and the
# storage behind it; sometimes anything msgpack can carry.
seqs = st.one_of(st.integers(1, 4), msgpack_ints)
steps = st.one_of(st.integers(0, 100), msgpack_ints)
rows = st.lists(
    st.tuples(steps, floats, st.dictionaries(metric_keys, metric_values, max_size=4)),
    max_size=5,
)
run_specs = st.fixed_dictionaries(
    {"id": short_text, "project": short_text, "name": short_text},
    optional={"config": st.dictionaries(short_text, msgpack_values, max_size=4)},
)
valid_trainer_messages = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("hello"),
            "v": st.one_of(st.just(PROTOCOL_VERSION), msgpack_ints),
            "run": run_specs,
        },
        optional={"client": short_text},
    ),
    st.fixed_dictionaries({"type": st.just("batch"), "seq": seqs, "rows": rows}),
    st.fixed_dictionaries(
        {"type": st.just("finish"), "seq": seqs},
        optional={"status": st.sampled_from(["finished", "crashed"])},
    ),
)


def _places(value: object, path: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
    """Every path to a value inside nested maps and arrays, ``value`` itself first."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _places(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _places(item, (*path, index))


def _mutable(value: object) -> object:
    """A copy in which rows and other tuples are lists, so that they can be mutated."""
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mutable(v) for v in value]
    return value


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A message that is valid, or nearly: fields given the wrong type, dropped, added,
    or a ``type`` tag changed, anywhere in the nesting."""
    message: Any = _mutable(draw(valid_trainer_messages))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_places(message))))
        if not path:
            continue
        parent = message
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "add", "retag"]))
        if action == "replace":
            parent[key] = draw(msgpack_values)
        elif action == "drop":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(short_text, long_text))] = draw(msgpack_values)
        elif action == "retag":
            message["type"] = draw(st.one_of(short_text, msgpack_values))
    return msgspec.msgpack.encode(message)


VALID_FRAMES: Final = [
    msgspec.msgpack.encode(m)
    for m in (
        Hello(v=PROTOCOL_VERSION, run=FUZZ, client="fuzz/1"),
        Batch(seq=1, rows=[(0, 1.5, {"loss": 2.0, "lr": math.nan}), (1, 2.5, {"loss": 1.0})]),
        Batch(seq=2, rows=[(2, 3.5, {"acc": math.inf})]),
        Finish(seq=3),
    )
]


@st.composite
def corrupted_frames(draw: st.DrawFn) -> bytes:
    """A real encoded frame with bytes flipped, overwritten, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at]
        else:
            del data[at:]
    return bytes(data)


def _deep(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x91" * depth + b"\xc0")  # [[[...[nil]...]]]


# Depths well below and well above the ~1000 where msgspec gives up (BUG_DEEP_NESTING),
# so that the test's thread and the server's agree on which side of it a frame is.
nesting_depths = st.sampled_from([1, 10, 100, 400, 5000, 30000])
deeply_nested_frames = st.one_of(
    st.builds(
        lambda depth: msgspec.msgpack.encode(
            {
                "type": "hello",
                "v": 1,
                "run": {**msgspec.to_builtins(FUZZ), "config": {"deep": _deep(depth)}},
            }
        ),
        nesting_depths,
    ),
    st.builds(
        lambda depth: msgspec.msgpack.encode(
            {"type": "batch", "seq": 1, "rows": [], "x": _deep(depth)}
        ),
        nesting_depths,
    ),
    st.builds(lambda depth: msgspec.msgpack.encode(_deep(depth)), nesting_depths),
)
oversized_frames = st.one_of(
    st.builds(lambda extra: b"\x00" * (MAX_FRAME_BYTES + extra), st.integers(0, 64)),
    st.builds(
        lambda extra: msgspec.msgpack.encode(
            Batch(seq=1, rows=[(0, 0.0, {"k" * (MAX_FRAME_BYTES + extra): 1.0})])
        ),
        st.integers(-64, 64),
    ),
)
# Batches the server stores (after a hello), to test what storage makes of their values.
well_formed_batches = st.builds(
    lambda seq, rows: msgspec.msgpack.encode(Batch(seq=seq, rows=rows)),
    st.integers(1, 4),
    st.lists(
        st.tuples(
            st.integers(-(2**63), INT64_MAX),
            floats,
            st.dictionaries(good_keys, metric_values, min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=4,
    ),
)
trainer_frames = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100),
    st.sampled_from(VALID_FRAMES).map(lambda frame: frame.decode("latin-1")),  # as text
    mutated_messages(),
    valid_trainer_messages.map(msgspec.msgpack.encode),
    well_formed_batches,
    corrupted_frames(),
    deeply_nested_frames,
    oversized_frames,
)


def _stepping_around_known_bugs(frames: list[Frame]) -> list[Frame]:
    kept = []
    for frame in frames:
        bug = _known_trainer_bug(frame)
        if bug is None:
            kept.append(frame)
        else:
            note(f"not sent: {bug[:60]}")
    return kept


@FUZZ_SETTINGS
@given(greet=st.booleans(), frames=st.lists(trainer_frames, min_size=1, max_size=3))
def test_bad_trainer_frames_get_a_reply_or_a_clear_close_and_others_are_still_served(
    client: TestClient, good_trainer: WellBehavedTrainer, greet: bool, frames: list[Frame]
) -> None:
    check_trainer_answers(client, _stepping_around_known_bugs(frames), greet=greet)
    good_trainer.logs_a_batch_and_finds_everything_stored()


# -- what a dashboard may be answered --------------------------------------------------


def check_dashboard_answers(
    client: TestClient,
    frames: list[Frame],
    good_metrics: dict[str, Any],
    timeout: float = ANSWER_TIMEOUT_S,
) -> None:
    """Send ``frames`` on a fresh dashboard connection, checking that each bad one gets
    an error, and that a valid ``subscribe`` is answered after each."""
    with client.websocket_connect("/ws/dashboard") as dash:
        assert receive_json(dash)["type"] == "hello"
        runs = receive_json(dash)
        assert runs["type"] == "runs" and GOOD.id in [run["id"] for run in runs["runs"]]
        for frame in frames:
            send_frame(dash, frame)
            valid = decode_dashboard_frame(frame)
            # A subscribe to a run of its own is answered after whatever the frame was.
            probe = f"probe-{uuid.uuid4()}"
            dash.send_text(json.dumps({"type": "subscribe", "run": probe, "after": 0}))
            answers: list[Any] = []
            while (answer := receive_answer(dash, timeout)).get("run") != probe:
                answers.append(answer)
            assert answer == {"type": "points", "run": probe, "seq": 0, "series": {}}
            if valid is None:
                assert len(answers) == 1 and answers[0]["type"] == "error", answers
                assert isinstance(answers[0]["message"], str) and answers[0]["message"]
            elif isinstance(valid, Subscribe):  # points, unless there is nothing to send
                assert [a["type"] for a in answers] in ([], ["points"]), answers
                assert all(a["run"] == valid.run for a in answers), answers
            else:
                assert isinstance(valid, Unsubscribe) and answers == [], answers
        # And what was stored is intact.
        dash.send_text(json.dumps({"type": "subscribe", "run": GOOD.id, "after": 0}))
        snapshot = receive_answer(dash, timeout)
        assert (snapshot["type"], snapshot["run"], snapshot["series"]) == (
            "points",
            GOOD.id,
            good_metrics,
        )


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([-1, 0, 1, INT64_MAX, 2**63, 2**64, 10**30, -(10**30)]),
        st.floats(),  # NaN and ±Infinity give JSON-ish text: json.dumps spells them bare
        st.text(max_size=12),
        st.sampled_from(["\ud800", "\udfff", "\x00", GOOD.id]),  # escaped by json.dumps
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
dashboard_messages = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.sampled_from(["subscribe", "unsubscribe", "Subscribe", "subscribe ", "points"]),
            json_values,
        ),
        "run": st.one_of(st.text(max_size=12), st.just(GOOD.id), json_values),
        "after": st.one_of(
            st.integers(), st.sampled_from([-1, 0, 1, 2**63, "1", 1.5]), json_values
        ),
        "extra": json_values,
    },
)


@st.composite
def damaged_json(draw: st.DrawFn) -> str:
    text = json.dumps(draw(st.one_of(dashboard_messages, json_values)))
    at = draw(st.integers(0, len(text)))
    action = draw(st.sampled_from(["truncate", "insert", "delete"]))
    if action == "truncate":
        return text[:at]
    if action == "insert":
        return text[:at] + draw(st.sampled_from(list('{}[]",:\\ 0e-'))) + text[at:]
    return text[:at] + text[at + 1 :]


deeply_nested_json = st.builds(
    lambda depth, where: where.replace("DEEP", "[" * depth + "]" * depth),
    nesting_depths,
    st.sampled_from(
        ['{"type":"subscribe","run":"r","x":DEEP}', '{"type":"subscribe","run":DEEP}', "DEEP"]
    ),
)
dashboard_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=50),
    json_values.map(json.dumps),
    dashboard_messages.map(json.dumps),
    damaged_json(),
    deeply_nested_json,
)


@FUZZ_SETTINGS
@given(frames=st.lists(dashboard_frames, min_size=1, max_size=4))
def test_bad_dashboard_messages_get_an_error_and_the_connection_stays_usable(
    client: TestClient, good_run: dict[str, Any], frames: list[Frame]
) -> None:
    check_dashboard_answers(client, frames, good_run)
    assert client.get(f"/api/runs/{GOOD.id}/metrics").json()["series"] == {
        key: {**series, "sampled": False} for key, series in good_run.items()
    }


# -- the server bugs this file found: one regression test each ----------------------------------

HELLO: Final = msgspec.msgpack.encode(Hello(v=PROTOCOL_VERSION, run=FUZZ))


def _hello_with_config(config: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(
        {
            "type": "hello",
            "v": PROTOCOL_VERSION,
            "run": {**msgspec.to_builtins(FUZZ), "config": config},
        }
    )


@contextlib.contextmanager
def _reported_briefly() -> Iterator[None]:
    """Turn an error out of the app into a one-line failure. pytest formats an xfail's
    whole exception chain, through every layer of the ASGI stack, which costs about a
    second a test; the line keeps the error's type and message, and the reproducer
    gives the rest."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"the app raised {type(exc).__name__}: {exc}") from None


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([b"\x81\xa4type\xa1\xff"], id="not-utf8"),
        pytest.param(
            [_hello_with_config({"deep": _deep(5000)})],
            id="deep-config",
        ),
        pytest.param(
            [HELLO, msgspec.msgpack.encode(Batch(seq=2**63, rows=[]))],
            id="seq-beyond-int64",
        ),
        pytest.param(
            [HELLO, msgspec.msgpack.encode(Batch(seq=1, rows=[(2**63, 0.0, {"x": 1.0})]))],
            id="step-beyond-int64",
        ),
        pytest.param(
            [HELLO, msgspec.msgpack.encode(Finish(seq=2**64 - 1))],
            id="finish-seq-beyond-int64",
        ),
        pytest.param(
            [HELLO, msgspec.msgpack.encode(Batch(seq=1, rows=[(0, math.nan, {"x": 1.0})]))],
            id="nan-time",
        ),
        pytest.param(
            [_hello_with_config({"layers": {b"bin": 1}})],
            id="config-bin-key",
        ),
        pytest.param(
            [_hello_with_config({"layers": {(1, 2): 1}})],
            id="config-array-key",
        ),
    ],
)
def test_frames_that_once_tripped_the_server_get_a_clear_answer(
    client: TestClient, good_trainer: WellBehavedTrainer, frames: list[Frame]
) -> None:
    with _reported_briefly():
        check_trainer_answers(client, frames, greet=False)
    good_trainer.logs_a_batch_and_finds_everything_stored()


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(
            '{"type":"subscribe","run":"r","after":9223372036854775808}',
            id="after-beyond-int64",
        ),
        pytest.param(
            '{"type":"subscribe","run":"r","x":' + "[" * 5000 + "]" * 5000 + "}",
            id="deep-ignored-field",
        ),
    ],
)
def test_dashboard_messages_that_once_tripped_the_server_get_an_answer(
    client: TestClient, good_run: dict[str, Any], frame: str
) -> None:
    # A short wait: one of these bugs shows as silence, and a fixed server answers at once.
    with _reported_briefly():
        check_dashboard_answers(client, [frame], good_run, timeout=1.0)
