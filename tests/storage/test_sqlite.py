from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunSpec
from trainwire.storage import Commit, SQLiteStore
from trainwire.storage.sqlite import SCHEMA_VERSION

SPEC = RunSpec(id="r1", project="digits", name="cnn", config={"lr": 0.003, "layers": [1, 2]})


def batch(seq: int, *steps: int) -> Batch:
    return Batch(seq=seq, rows=[(s, 100.0 + s, {"loss": 1.0 / (s + 1), "acc": 0.5}) for s in steps])


def test_a_new_file_gets_the_current_schema_in_wal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "t.db")
    store.close()
    db = sqlite3.connect(tmp_path / "sub" / "t.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_from_a_newer_trainwire_is_refused(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "t.db").execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="upgrade trainwire"):
        SQLiteStore(tmp_path / "t.db")


def test_runs_and_points_survive_reopening(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    assert store.open_run(SPEC, "s", now=1.0) == 0
    assert store.append_batch("r1", "s", batch(1, 0, 1), now=2.0) == Commit(prev_seq=0, seq=1)
    store.close()
    store = SQLiteStore(tmp_path / "t.db")
    [run] = store.list_runs()
    assert (run.id, run.status, run.config, run.created, run.updated) == (
        "r1",
        "running",
        SPEC.config,
        1.0,
        2.0,
    )
    last_seq, series = store.metrics("r1")
    assert last_seq == 1
    assert series["loss"].step == [0, 1] and series["loss"].value == [1.0, 0.5]
    assert series["loss"].time == [100.0, 101.0]
    assert store.keys("r1") == ["loss", "acc"]
    assert store.open_run(SPEC, "s", now=3.0) == 1  # reopening returns where it stands
    assert store.integrity_check() == "ok"


def test_a_batch_is_stored_once_however_often_it_is_sent(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    assert store.append_batch("r1", "s", batch(1, 0), now=1.0) is not None
    assert store.append_batch("r1", "s", batch(1, 0), now=1.0) is None
    assert store.append_batch("r1", "s", batch(2, 1), now=1.0) == Commit(prev_seq=1, seq=2)
    assert store.append_batch("r1", "s", batch(1, 0), now=1.0) is None
    _, series = store.metrics("r1")
    assert series["loss"].step == [0, 1]


def test_metrics_after_a_seq_and_for_chosen_keys(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in range(1, 5):
        store.append_batch("r1", "s", batch(seq, seq * 10), now=1.0)
    last_seq, series = store.metrics("r1", keys=["acc"], after=2)
    assert last_seq == 4 and list(series) == ["acc"] and series["acc"].step == [30, 40]
    assert store.metrics("nope") == (0, {})


def test_nan_and_infinities_round_trip(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    rows = [(0, 1.0, {"x": math.nan}), (1, 1.0, {"x": math.inf}), (2, 1.0, {"x": -math.inf})]
    store.append_batch("r1", "s", Batch(seq=1, rows=rows), now=1.0)
    values = store.metrics("r1")[1]["x"].value
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf]  # type: ignore[arg-type]


def test_status_changes_are_sequenced_like_batches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    store.append_batch("r1", "s", batch(1, 0), now=1.0)
    info = store.set_status("r1", "s", "finished", seq=2, now=5.0)
    assert info is not None and info.status == "finished"
    assert store.set_status("r1", "s", "finished", seq=2, now=6.0) is None
    assert store.metrics("r1")[0] == 1  # the commit counter counts batches of points only


def test_writing_to_an_unknown_run_is_a_storage_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(StorageError, match="no stream 's' in run 'ghost'"):
        store.append_batch("ghost", "s", batch(1, 0), now=1.0)
    assert store.get_run("ghost") is None


def test_streams_are_numbered_apart_and_the_run_commit_counter_orders_them(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    assert store.open_run(SPEC, "a", now=1.0) == 0
    assert store.open_run(SPEC, "b", now=1.0) == 0
    assert store.append_batch("r1", "a", batch(1, 0), now=1.0) == Commit(0, 1)
    assert store.append_batch("r1", "b", batch(1, 0), now=1.0, prefix="rank1/") == Commit(1, 2)
    assert store.append_batch("r1", "a", batch(1, 0), now=1.0) is None
    assert store.open_run(SPEC, "a", now=2.0) == 1
    assert store.keys("r1") == ["loss", "acc", "rank1/loss", "rank1/acc"]
    assert store.metrics("r1", after=1)[1]["rank1/loss"].step == [0]


def test_a_run_is_finished_when_every_stream_is_and_crashed_if_one_vanished(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    store.open_run(SPEC, "b", now=1.0)
    info = store.set_status("r1", "a", "finished", seq=1, now=2.0)
    assert info is not None and info.status == "running"
    assert store.running_runs() == ["r1"]
    info = store.mark_crashed("r1", now=3.0)
    assert info is not None and info.status == "crashed"
    assert store.running_runs() == []
    # The vanished writer comes back: the run is running again.
    store.open_run(SPEC, "b", now=4.0)
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]
    info = store.set_status("r1", "b", "finished", seq=1, now=5.0)
    assert info is not None and info.status == "finished"
