from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trainwire.exceptions import StorageError
from trainwire.protocol.messages import Batch, RunSpec
from trainwire.storage import (
    Commit,
    SampledSeries,
    SeriesSummary,
    SQLiteStore,
    sqlite as sqlite_module,
)
from trainwire.storage.sqlite import MERGE_AT, SCHEMA_VERSION

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


def test_a_file_at_the_current_version_missing_a_table_is_refused_at_open(
    tmp_path: Path,
) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.execute("DROP TABLE streams")
    with pytest.raises(StorageError, match="lacks the table\\(s\\) streams"):
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


def test_keys_past_the_runs_limit_are_left_out_and_named_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    """The limit is the run's, over every stream and rank prefix; a key the run
    already has is stored whatever the count."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    store.open_run(SPEC, "b", now=1.0)
    assert store.append_batch("r1", "a", batch(1, 0), now=1.0, max_keys=3) == Commit(0, 1)
    extra = Batch(seq=1, rows=[(0, 1.0, {"loss": 2.0, "lr": 0.1}), (1, 2.0, {"grad": 3.0})])
    commit = store.append_batch("r1", "b", extra, now=1.0, prefix="rank1/", max_keys=3)
    assert commit == Commit(1, 2, refused=("lr", "grad"))
    more = Batch(seq=2, rows=[(1, 3.0, {"loss": 0.5, "acc": 0.7, "lr": 0.2})])
    assert store.append_batch("r1", "a", more, now=1.0, max_keys=3) == Commit(2, 3, ("lr",))
    assert store.keys("r1") == ["loss", "acc", "rank1/loss"]
    series = store.metrics("r1")[1]
    assert {k: v.value for k, v in series.items()} == {
        "loss": [1.0, 0.5],
        "acc": [0.5, 0.7],
        "rank1/loss": [2.0],
    }
    # Without a limit, every key is stored.
    unbounded = Batch(seq=2, rows=[(2, 4.0, {"lr": 0.3})])
    assert store.append_batch("r1", "b", unbounded, now=1.0, prefix="rank1/") == Commit(3, 4)
    assert "rank1/lr" in store.keys("r1")


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


def test_reviving_a_run_undoes_mark_crashed_and_a_finished_stream_stays_finished(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    store.open_run(SPEC, "b", now=1.0)
    store.set_status("r1", "a", "finished", seq=1, now=2.0)
    store.mark_crashed("r1", now=3.0)
    info = store.revive("r1", now=4.0)
    assert info is not None and info.status == "running"
    assert store.running_runs() == ["r1"]
    info = store.set_status("r1", "b", "finished", seq=1, now=5.0)
    assert info is not None and info.status == "finished"  # "a" was not revived


# -- chunks: compaction, history, summary --------------------------------------------------

Logged = tuple[int, str, int, float, float]  # commit, key, step, time, value


def model_metrics(log: list[Logged], after: int) -> dict[str, tuple[list[int], list[float]]]:
    """What a row-per-point store answers: points committed after ``after``, per key in
    order of the key's first point, in logging order."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for _, key, _, _, _ in log:
        series.setdefault(key, ([], []))
    for seq, key, step, time, _ in log:
        if seq > after:
            series[key][0].append(step)
            series[key][1].append(time)
    return {key: columns for key, columns in series.items() if columns[0]}


def as_columns(store: SQLiteStore, run_id: str, after: int) -> dict[str, Any]:
    _, series = store.metrics(run_id, after=after)
    return {key: (s.step, s.time) for key, s in series.items()}


def chunk_rows(path: Path) -> list[tuple[int, int, int, int]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT series_id, seq_lo, seq_hi, n FROM chunks ORDER BY series_id, seq_hi"
        ).fetchall()


batches = st.lists(
    st.tuples(
        # Mostly the tiny batches of a live trainer, sometimes a large one.
        st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(8, 40)),
        st.sampled_from([("a",), ("b",), ("a", "b")]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches)
def test_compacted_chunks_answer_every_catch_up_as_one_row_per_point_would(
    tmp_path_factory: pytest.TempPathFactory, batches: list[tuple[int, tuple[str, ...]]]
) -> None:
    """Small constants, so that merges, merges of merged chunks and large chunks that
    end a run of small ones all happen within a few dozen batches."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_module, "SMALL_CHUNK", 16)
        patch.setattr(sqlite_module, "MERGE_AT", 4)
        check_compaction(tmp_path_factory.mktemp("compaction") / "t.db", batches)


def check_compaction(path: Path, batches: list[tuple[int, tuple[str, ...]]]) -> None:
    store = SQLiteStore(path)
    store.open_run(SPEC, "s", now=1.0)
    log: list[Logged] = []
    step = 0
    for seq, (rows, keys) in enumerate(batches, start=1):
        batch_rows = []
        for _ in range(rows):
            values = {key: float(step % 5) for key in keys}
            batch_rows.append((step, float(step), values))
            log.extend((seq, key, step, float(step), values[key]) for key in keys)
            step += 1
        assert store.append_batch("r1", "s", Batch(seq=seq, rows=batch_rows), now=1.0)
        if seq % 7 == 0:  # a server restart: the tails are counted afresh
            store.close()
            store = SQLiteStore(path)
    for after in range(len(batches) + 1):
        assert as_columns(store, "r1", after) == model_metrics(log, after), after
        # The catch-up's reading: the same points, each with the commit it came in.
        _, committed = store.columns_after("r1", after)
        assert {
            key: (c.steps.tolist(), c.times.tolist()) for key, c in committed.items()
        } == model_metrics(log, after), after
        for key, c in committed.items():
            assert c.commits.tolist() == [q for q, k, _, _, _ in log if k == key and q > after]
    # Bounded: per key, one row per 16 points, 3 small at the end, 3 before each large one.
    rows = chunk_rows(path)
    for series_id in {row[0] for row in rows}:
        mine = [row for row in rows if row[0] == series_id]
        large = sum(1 for row in mine if row[3] >= 16)
        assert len(mine) <= large + 3 * (large + 1), mine
    assert store.integrity_check() == "ok"
    store.close()


def test_a_live_trainers_tiny_batches_are_merged_as_they_come(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in range(1, 201):  # two rows per batch, as at 100 steps/s with a 20 ms flush
        store.append_batch("r1", "s", batch(seq, 2 * seq, 2 * seq + 1), now=1.0)
    per_key = [row for row in chunk_rows(tmp_path / "t.db") if row[0] == 1]
    assert len(per_key) < MERGE_AT and per_key[0][1:] == (1, 187, 374)
    last_seq, series = store.metrics("r1", keys=["loss"], after=150)
    assert last_seq == 200 and series["loss"].step == list(range(302, 402))


class CommitsBetweenSeries(SQLiteStore):
    """Before each series that history reads, a trainer commits a batch, as one may:
    the store is free between series."""

    seq = 3

    def _series_as_of(self, *args: Any, **kwargs: Any) -> Any:
        assert self._lock.acquire(blocking=False), "history holds the store between series"
        self._lock.release()
        self.seq += 1
        self.append_batch("r1", "s", batch(self.seq, 100 + self.seq), now=2.0)
        return super()._series_as_of(*args, **kwargs)


def test_history_reads_one_series_at_a_time_as_of_its_seq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at once, a long run's every blob was in memory (and the lock held) to
    chart 2,000 points per key. Read a series at a time, the answer is still the run
    as of its seq, so that a dashboard subscribing after it misses nothing and gets
    nothing twice: even from a chunk that compaction merged across that seq."""
    monkeypatch.setattr(sqlite_module, "MERGE_AT", 2)  # each commit merges the series whole
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in (1, 2, 3):
        store.append_batch("r1", "s", batch(seq, seq - 1), now=1.0)
    store.close()
    store = CommitsBetweenSeries(tmp_path / "t.db")
    seq, series = store.history("r1", points=1000)
    assert seq == 3
    assert {key: s.step for key, s in series.items()} == {"loss": [0, 1, 2], "acc": [0, 1, 2]}
    assert {row[1:3] for row in chunk_rows(tmp_path / "t.db")} == {(1, 5)}  # read, then cut
    later = store.metrics("r1", after=seq)[1]
    assert {key: s.step for key, s in later.items()} == {"loss": [104, 105], "acc": [104, 105]}


class DeletedBetweenSeries(SQLiteStore):
    """Before history reads the run's second series, the run is deleted and another
    made, whose second key gets the id the deleted one had."""

    def _series_as_of(self, run_id: str, series_id: int, *args: Any) -> Any:
        if series_id == 2 and self.delete_run(run_id):
            self.open_run(RunSpec(id="other", project="p", name="n"), "s", now=2.0)
            rows = [(7, 2.0, {"x": 7.0, "y": 7.0})]
            self.append_batch("other", "s", Batch(seq=1, rows=rows), now=2.0)
            assert self.keys("other") == ["x", "y"] and self._series_id("other", "y") == 2
        return super()._series_as_of(run_id, series_id, *args)


def test_history_never_reads_another_runs_series_under_a_reused_id(tmp_path: Path) -> None:
    store = DeletedBetweenSeries(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    store.append_batch("r1", "s", batch(1, 0, 1), now=1.0)
    seq, series = store.history("r1")
    assert seq == 1 and series["loss"].step == [0, 1]
    assert series["acc"].step == []  # deleted meanwhile: nothing, not the other run's "y"


class MadeAnewBetweenSeries(SQLiteStore):
    """Before history reads the run's second series, the run is deleted, and its
    writer, still going, opens it anew (as a trainer reconnecting after 4410 does):
    same run id, its keys in another order, so its "loss" gets the id "acc" had."""

    def _series_as_of(self, run_id: str, series_id: int, *args: Any) -> Any:
        if series_id == 2 and self.delete_run(run_id):
            self.open_run(SPEC, "s", now=2.0)
            rows = [(7, 2.0, {"acc": 99.0, "loss": 42.0})]
            self.append_batch(run_id, "s", Batch(seq=1, rows=rows), now=2.0)
            assert self._series_id(run_id, "loss") == 2
        return super()._series_as_of(run_id, series_id, *args)


def test_history_never_reads_the_series_of_its_run_made_anew_under_a_reused_id(
    tmp_path: Path,
) -> None:
    """Checked on series id and run id alone, "acc" came back holding the new run's
    "loss" (42.0 at step 7): its commit 1 is under the old run's seq."""
    store = MadeAnewBetweenSeries(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    store.append_batch("r1", "s", batch(1, 0, 1), now=1.0)
    seq, series = store.history("r1")
    assert seq == 1 and series["loss"].step == [0, 1]
    assert series["acc"].step == []  # the run read is gone: nothing of the new one
    assert store.history("r1")[1]["loss"].value == [42.0]  # the new run, read afresh


def test_an_ended_run_is_forgotten_by_the_store_and_written_to_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store kept every series it had written to (300 bytes each, for the life of
    the server: 120 MB for a sweep of 1,000 runs of 400 keys). A run that ends is
    forgotten; a file of it uploaded later finds its series, and its compaction, in
    the table."""
    monkeypatch.setattr(sqlite_module, "MERGE_AT", 4)
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in (1, 2, 3):
        store.append_batch("r1", "s", batch(seq, seq), now=1.0)
    assert store._series_ids and store._small_tails
    store.set_status("r1", "s", "finished", 4, now=2.0)
    assert store._series_ids == {} and store._small_tails == {}
    store.open_run(SPEC, "late", now=3.0, replay=True)
    assert store.append_batch("r1", "late", batch(1, 4), now=3.0) == Commit(3, 4)
    assert store.keys("r1") == ["loss", "acc"]
    assert [row[1:] for row in chunk_rows(tmp_path / "t.db")] == [(1, 4, 4)] * 2  # merged
    assert store.metrics("r1")[1]["loss"].step == [1, 2, 3, 4]


def test_history_reads_a_step_range_across_chunk_boundaries(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    # Chunks of steps 0-9, 10-19, ... and one written out of order, after the others.
    for seq, first in enumerate([0, 10, 20, 40, 30], start=1):
        store.append_batch("r1", "s", batch(seq, *range(first, first + 10)), now=1.0)
    store.append_batch("r1", "s", batch(6, 25), now=1.0)  # step 25 again
    seq, series = store.history("r1", ["loss"], start=18, end=32)
    assert seq == 6 and list(series) == ["loss"]
    loss = series["loss"]
    assert loss.step == [18, 19, 20, 21, 22, 23, 24, 25, 25, 26, 27, 28, 29, 30, 31, 32]
    assert loss.time[7:9] == [125.0, 125.0] and not loss.sampled
    assert store.history("r1", start=100)[1] == {
        "loss": SampledSeries([], [], [], False),
        "acc": SampledSeries([], [], [], False),
    }
    assert store.history("r1", ["nope"]) == (6, {})
    assert store.history("ghost") == (0, {})
    _, everything = store.history("r1", ["acc"], points=10)
    acc = everything["acc"]
    assert acc.sampled and len(acc.step) <= 10 and acc.step == sorted(acc.step)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(st.integers(-20, 60), min_size=1, max_size=80),
    cuts=st.lists(st.integers(1, 79), max_size=6),
    start=st.none() | st.integers(-30, 70),
    end=st.none() | st.integers(-30, 70),
)
def test_history_is_every_point_of_the_range_sorted_by_step(
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[int],
    cuts: list[int],
    start: int | None,
    end: int | None,
) -> None:
    store = SQLiteStore(tmp_path_factory.mktemp("history") / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    bounds = [0, *sorted({c for c in cuts if c < len(steps)}), len(steps)]
    for seq, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        rows = [(steps[i], float(i), {"x": float(i)}) for i in range(lo, hi)]
        store.append_batch("r1", "s", Batch(seq=seq, rows=rows), now=1.0)
    _, series = store.history("r1", start=start, end=end)
    expected = sorted(
        (s, i)
        for i, s in enumerate(steps)
        if (start is None or s >= start) and (end is None or s <= end)
    )
    got = series["x"]
    assert list(zip(got.step, got.time, strict=True)) == [(s, float(i)) for s, i in expected]
    assert got.value == got.time and not got.sampled
    store.close()


def test_history_is_sorted_by_step_when_a_step_goes_back_by_more_than_2_63(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    big, small = 2**62 + 1, -(2**62)  # big - small > 2**63 - 1: a difference would wrap
    rows = [(big, 1.0, {"x": 1.0}), (small, 2.0, {"x": 2.0})]
    store.append_batch("r1", "s", Batch(seq=1, rows=rows), now=1.0)
    _, series = store.history("r1")
    assert series["x"].step == [small, big]
    assert series["x"].value == [2.0, 1.0]
    store.close()


def test_the_summary_is_count_last_and_finite_extremes_per_key(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    rows = [(5, 1.0, {"x": 3.0, "y": math.nan}), (2, 1.0, {"x": -math.inf})]
    store.append_batch("r1", "s", Batch(seq=1, rows=rows), now=1.0)
    store.append_batch("r1", "s", Batch(seq=2, rows=[(1, 1.0, {"x": -7.5})]), now=1.0)
    summary = store.summary("r1")
    assert list(summary) == ["x", "y"]
    # The last point as logged, not the highest step; extremes of finite values only.
    assert summary["x"] == SeriesSummary(count=3, last=-7.5, last_step=1, min=-7.5, max=3.0)
    y = summary["y"]
    assert (y.count, y.last_step, y.min, y.max) == (1, 5, None, None) and math.isnan(y.last)
    assert store.summary("ghost") == {}


def test_deleting_a_run_deletes_its_chunks_and_nothing_else(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    other = RunSpec(id="r2", project="p", name="n")
    for spec in (SPEC, other):
        store.open_run(spec, "s", now=1.0)
        for seq in range(1, 40):
            store.append_batch(spec.id, "s", batch(seq, seq), now=1.0)
    assert store.delete_run("r1") and not store.delete_run("r1")
    assert store.metrics("r1") == (0, {})
    assert store.metrics("r2")[1]["loss"].step == list(range(1, 40))
    # A new run may take the deleted series' ids: its chunks start afresh.
    store.open_run(SPEC, "s", now=2.0)
    store.append_batch("r1", "s", batch(1, 100), now=2.0)
    assert store.metrics("r1")[1]["loss"].step == [100]
    assert store.integrity_check() == "ok"


def chunk_count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])


def test_a_big_run_is_deleted_a_slice_at_a_time_with_the_lock_free_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted in one transaction, a 12,000,000-point run held every read and commit
    for 4 s. Each slice now takes the lock anew: another thread gets it between."""
    monkeypatch.setattr(sqlite_module, "DELETE_SLICE", 2)
    monkeypatch.setattr(sqlite_module, "MERGE_AT", 1_000)  # a chunk per commit and key
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in range(1, 11):
        store.append_batch("r1", "s", batch(seq, seq), now=1.0)
    assert chunk_count(tmp_path / "t.db") == 20  # 10 commits x 2 keys

    class CountingLock:
        """The store's lock, counting how often it is taken."""

        def __init__(self, lock: Any) -> None:
            self.lock, self.taken = lock, 0

        def __enter__(self) -> None:
            self.lock.acquire()
            self.taken += 1

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    lock = CountingLock(store._lock)
    store._lock = lock  # type: ignore[assignment]
    assert store.delete_run("r1")
    assert lock.taken >= 1 + 20 // 2  # the detaching, then a slice of 2 chunks at a time
    assert chunk_count(tmp_path / "t.db") == 0
    assert store.metrics("r1") == (0, {}) and store.integrity_check() == "ok"


def test_a_delete_cut_short_is_finished_at_open_and_never_reaches_the_runs_new_writer(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    for seq in range(1, 6):
        store.append_batch("r1", "s", batch(seq, seq), now=1.0)
    assert store.detach_run("r1")  # and the server stopped before the purge
    assert store.metrics("r1") == (0, {})  # gone for readers at once
    # A trainer still writing opens the run anew: its own series, not the old ones.
    store.open_run(SPEC, "s", now=2.0)
    store.append_batch("r1", "s", batch(1, 100), now=2.0)
    assert store.metrics("r1")[1]["loss"].step == [100]
    store.close()
    store = SQLiteStore(tmp_path / "t.db")  # the next start finishes the delete
    assert store.metrics("r1")[1]["loss"].step == [100]
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("SELECT run_id, key FROM series ORDER BY key").fetchall() == [
            ("r1", "acc"),
            ("r1", "loss"),
        ]
    assert chunk_count(tmp_path / "t.db") == 2 and store.integrity_check() == "ok"


def test_a_purge_that_fails_at_open_leaves_the_points_for_later_and_the_store_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A purge left over (a delete cut short) that cannot run at the next start (a
    full disk: freeing pages writes them to the WAL first) refused the start: the
    server stayed down for points no reader could see any more."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "s", now=1.0)
    store.append_batch("r1", "s", batch(1, 1), now=1.0)
    assert store.detach_run("r1")
    store.close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.execute(
            "CREATE TRIGGER full BEFORE DELETE ON chunks"
            " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
        )
    store = SQLiteStore(tmp_path / "t.db")
    assert "points of deleted runs left for later (database or disk is full)" in caplog.text
    assert store.list_runs() == [] and store.metrics("r1") == (0, {})
    store.open_run(SPEC, "s", now=2.0)  # served as ever
    assert store.append_batch("r1", "s", batch(1, 5), now=2.0) == Commit(0, 1)
    store.close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.execute("DROP TRIGGER full")
    store = SQLiteStore(tmp_path / "t.db")  # the next start purges
    assert chunk_count(tmp_path / "t.db") == 2  # the new run's
    assert store.metrics("r1")[1]["loss"].step == [5]


def test_the_environment_is_kept_from_the_first_opening(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    first = msgspec.structs.replace(SPEC, env={"host": "a", "gpus": ["H100"]})
    store.open_run(first, "s", now=1.0)
    store.open_run(msgspec.structs.replace(SPEC, env={"host": "b"}), "t", now=2.0)
    run = store.get_run("r1")
    assert run is not None and run.env == {"host": "a", "gpus": ["H100"]}
    assert store.list_runs()[0].env == run.env


def test_the_run_list_as_json_is_list_runs_encoded_newest_first(tmp_path: Path) -> None:
    """runs_json passes each stored config through rather than decoding it and
    encoding it again (2 s for 5,000 runs of 5 KB each): the same document, whatever
    the store holds, a config stored leniently (NaN, as early builds wrote it)
    included."""
    store = SQLiteStore(tmp_path / "t.db")
    assert msgspec.json.decode(store.runs_json()) == []
    nested = {"model": {"layers": [{"ffn": 4096, "act": "gelu"}] * 3}, "note": 'é " \n'}
    store.open_run(msgspec.structs.replace(SPEC, config=nested, env={"gpus": ["H100"]}), "s", 1.0)
    store.open_run(RunSpec(id="r2", project="p", name="n"), "s", now=3.0)
    store.open_run(RunSpec(id="r3", project="p", name="old"), "s", now=2.0)
    store._db.execute("UPDATE runs SET config = '{\"lr\": NaN}' WHERE id = 'r3'")
    listed = msgspec.json.decode(store.runs_json())
    assert [run["id"] for run in listed] == ["r2", "r3", "r1"]
    assert listed == msgspec.json.decode(msgspec.json.encode(store.list_runs()))
    assert listed[2]["config"] == nested and listed[2]["env"] == {"gpus": ["H100"]}
    assert listed[1]["config"] == {"lr": None}  # valid JSON, as list_runs gives it


def test_a_version_3_file_gets_the_index_that_lists_runs_without_sorting_them(
    tmp_path: Path,
) -> None:
    make_v3_file(tmp_path / "t.db")
    store = SQLiteStore(tmp_path / "t.db")
    assert store.list_runs()[0].id == "r1"
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    plan = db.execute(
        f"EXPLAIN QUERY PLAN SELECT {sqlite_module._RUN_COLUMNS} FROM runs ORDER BY created DESC"
    ).fetchall()
    assert [row[3] for row in plan] == ["SCAN runs USING INDEX runs_by_created"]


# -- migration from version 2 ----------------------------------------------------------


def make_v2_file(path: Path, points: list[tuple[int, int, int, float, float | None]]) -> None:
    """A file as trainwire with schema version 2 left it: ``(series_id, seq, step, time,
    value)`` rows in ``points``, NaN stored as NULL; series 1 is "loss", 2 is "acc"."""
    db = sqlite3.connect(path, isolation_level=None)
    for version, step in enumerate(sqlite_module._MIGRATIONS[:2], start=1):
        assert isinstance(step, str)  # the old DDL, as it was
        db.executescript(f"BEGIN; {step} PRAGMA user_version = {version}; COMMIT;")
    last = max((seq for _, seq, _, _, _ in points), default=0)
    db.execute(
        "INSERT INTO runs VALUES ('r1', 'digits', 'cnn', 'finished', 1.0, 2.0, '{\"lr\": 1}', ?)",
        (last,),
    )
    db.execute("INSERT INTO streams VALUES ('r1', 's', ?, 'finished')", (last,))
    db.execute("INSERT INTO series VALUES (1, 'r1', 'loss'), (2, 'r1', 'acc')")
    db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?)", points)
    db.execute("INSERT INTO tokens (id, hash, scope, created) VALUES ('t1', 'abc', 'read', 1.0)")
    db.close()


def test_a_version_2_file_is_migrated_to_chunks_losing_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "SMALL_CHUNK", 5)  # several chunks per series
    points: list[tuple[int, int, int, float, float | None]] = []
    for seq in range(1, 9):
        for step in range(seq * 3, seq * 3 + seq % 3 + 1):
            points.append((1, seq, step, float(step), None if step == 7 else step / 2))
        points.append((2, seq, 100 - seq, 0.5, float(seq)))  # logged out of step order
    make_v2_file(tmp_path / "t.db", points)
    store = SQLiteStore(tmp_path / "t.db")
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "points" not in tables and {"chunks", "tokens"} <= tables
    assert len(chunk_rows(tmp_path / "t.db")) < len(points)
    db.close()
    for after in range(9):
        _, series = store.metrics("r1", after=after)
        for series_id, key in ((1, "loss"), (2, "acc")):
            mine = [p for p in points if p[0] == series_id and p[1] > after]
            if not mine:
                assert key not in series
                continue
            assert series[key].step == [p[2] for p in mine]
            assert series[key].time == [p[3] for p in mine]
            # NULL was NaN: compare NaN by name, since NaN != NaN.
            got = ["NaN" if v != v else v for v in series[key].value]
            assert got == ["NaN" if p[4] is None else p[4] for p in mine]
    run = store.get_run("r1")
    assert run is not None and (run.env, run.config, run.status) == ({}, {"lr": 1}, "finished")
    assert store.summary("r1")["acc"] == SeriesSummary(8, 8.0, 92, 1.0, 8.0)
    # The stream goes on where it stood, and compaction with it.
    assert store.open_run(SPEC, "s", now=3.0) == 8
    assert store.append_batch("r1", "s", batch(9, 200), now=3.0) == Commit(8, 9)
    assert store.metrics("r1", keys=["loss"], after=8)[1]["loss"].step == [200]
    assert store.integrity_check() == "ok"


def test_an_empty_version_2_file_is_migrated(tmp_path: Path) -> None:
    make_v2_file(tmp_path / "t.db", [])
    store = SQLiteStore(tmp_path / "t.db")
    assert store.metrics("r1") == (0, {}) and store.summary("r1") == {}
    assert store.integrity_check() == "ok"


def test_a_stream_that_finished_as_crashed_is_not_revived_by_its_hello_again(
    tmp_path: Path,
) -> None:
    """`finish` with status crashed is the writer's own end, like `finished`: its
    hello again (a resend after a lost ack, `trainwire sync` run twice) is no return."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    info = store.set_status("r1", "a", "crashed", seq=1, now=2.0)
    assert info is not None and info.status == "crashed"
    assert store.open_run(SPEC, "a", now=3.0) == 1
    assert store.get_run("r1").status == "crashed"  # type: ignore[union-attr]
    assert store.running_runs() == []


def test_revive_undoes_mark_crashed_only_not_a_writers_own_crashed_finish(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    store.open_run(SPEC, "b", now=1.0)
    store.set_status("r1", "a", "crashed", seq=1, now=2.0)  # rank "a" raised and said so
    store.mark_crashed("r1", now=3.0)  # the reaper, as "b" says hello again
    store.revive("r1", now=4.0)
    info = store.set_status("r1", "b", "finished", seq=1, now=5.0)
    # "a" ended as crashed: the run is crashed, not running on a writer long gone.
    assert info is not None and info.status == "crashed"
    assert store.running_runs() == []


def test_a_batch_of_many_new_keys_counts_the_runs_keys_once(tmp_path: Path) -> None:
    """The key limit is checked under the store's lock, which every writer and
    dashboard waits for: counting the run's keys again for each new key of a batch
    made a batch of many keys past the limit cost seconds (16,384 keys on a run at
    10,000: 11 s), and one that fills a run quadratic in its keys."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "a", now=1.0)
    counts: list[str] = []
    store._db.set_trace_callback(
        lambda sql: counts.append(sql) if "COUNT(*) FROM series" in sql else None
    )
    fill = Batch(seq=1, rows=[(0, 1.0, {f"k{i}": 1.0 for i in range(50)})])
    assert store.append_batch("r1", "a", fill, now=1.0, max_keys=60) == Commit(0, 1)
    past = Batch(seq=2, rows=[(1, 1.0, {f"x{i}": 1.0 for i in range(40)})])
    commit = store.append_batch("r1", "a", past, now=1.0, max_keys=60)
    assert commit is not None and commit.refused == tuple(f"x{i}" for i in range(10, 40))
    assert len(store.keys("r1")) == 60
    assert len(counts) <= 2, f"{len(counts)} counts for 2 batches"


def test_streams_set_aside_count_for_nothing_and_those_kept_still_do(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    for stream in ("killed", "gone", "ended", "kept", "resumed"):
        store.open_run(SPEC, stream, now=1.0)
    store.set_status("r1", "ended", "crashed", seq=1, now=1.0)  # its writer's own end
    info = store.set_aside("r1", keep={"kept", "resumed"}, now=2.0)
    assert info is not None and info.status == "running"
    store.set_status("r1", "resumed", "finished", seq=1, now=3.0)
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]  # "kept"
    store.set_status("r1", "kept", "finished", seq=1, now=4.0)
    # "ended" crashed by its own finish (the attempt the resume replaces): set aside
    # too, so the run ends as its resumed writers do.
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]
    assert store.running_runs() == []
    # A writer that crashes after the resume still makes the run crashed.
    store.open_run(SPEC, "late", now=5.0)
    store.set_status("r1", "late", "crashed", seq=1, now=6.0)
    assert store.get_run("r1").status == "crashed"  # type: ignore[union-attr]


def test_a_file_uploaded_late_into_a_run_adds_its_rows_but_not_its_writers_fate(
    tmp_path: Path,
) -> None:
    """A trainer killed while the server was away, its run resumed and finished,
    then its file synced: the rows are stored, and the run stays finished."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "resumed", now=1.0)
    store.set_status("r1", "resumed", "finished", seq=1, now=2.0)
    assert store.open_run(SPEC, "killed", now=3.0, replay=True) == 0
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]
    store.append_batch("r1", "killed", batch(1, 0, 1), now=3.0)
    assert store.metrics("r1")[1]["loss"].step == [0, 1]
    # A file persisted by an attempt that raised ends "crashed": set aside, it stays so.
    store.set_status("r1", "killed", "crashed", seq=2, now=4.0)
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]
    assert store.running_runs() == []


def test_files_of_the_ranks_of_one_job_each_count_in_the_runs_status(tmp_path: Path) -> None:
    """An offline job's ranks, their files synced one after the other: the first made
    the run, and every later one was set aside, so a rank that crashed left the run
    "finished" (and one killed, with no end in its file, left it finished too)."""
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "rank0", now=1.0, rank=0, replay=True)
    store.set_status("r1", "rank0", "finished", seq=1, now=2.0)
    store.open_run(SPEC, "rank1", now=3.0, rank=1, replay=True)
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]
    store.set_status("r1", "rank1", "crashed", seq=1, now=4.0)
    assert store.get_run("r1").status == "crashed"  # type: ignore[union-attr]
    # A later attempt of rank 1 took its place (resumed, finished): a file of an
    # earlier rank 1, synced now, is that replaced writer's, and is set aside.
    store.open_run(SPEC, "rank1-again", now=5.0, rank=1)
    store.set_aside("r1", keep={"rank1-again"}, now=5.0)
    store.set_status("r1", "rank1-again", "finished", seq=1, now=6.0)
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]
    store.open_run(SPEC, "rank1-killed", now=7.0, rank=1, replay=True)
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]


def make_v3_file(path: Path) -> None:
    """A file as trainwire with schema version 3 left it: run r1, finished, with one
    stream "old" at seq 3."""
    db = sqlite3.connect(path, isolation_level=None)
    for version, step in enumerate(sqlite_module._MIGRATIONS[:3], start=1):
        if isinstance(step, str):  # the old DDL, as it was
            db.executescript(f"BEGIN; {step} PRAGMA user_version = {version}; COMMIT;")
        else:
            step(db)
            db.execute(f"PRAGMA user_version = {version}")
    db.execute(
        "INSERT INTO runs (id, project, name, status, created, updated, config)"
        " VALUES ('r1', 'digits', 'cnn', 'finished', 1.0, 2.0, '{}')"
    )
    db.execute("INSERT INTO streams VALUES ('r1', 'old', 3, 'finished')")
    db.close()


def test_a_version_3_file_gets_the_rank_of_streams(tmp_path: Path) -> None:
    make_v3_file(tmp_path / "t.db")
    store = SQLiteStore(tmp_path / "t.db")
    # The old stream has no rank: taken as rank None's, whose late file it replaced.
    assert store.open_run(SPEC, "old", now=3.0) == 3
    store.open_run(SPEC, "late", now=4.0, replay=True)
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]
    store.open_run(SPEC, "rank2", now=5.0, rank=2, replay=True)
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]


def test_a_file_that_is_the_whole_run_ends_it_as_its_writer_did(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "offline", now=1.0, replay=True)  # a new run: its own status
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]
    store.set_status("r1", "offline", "finished", seq=1, now=2.0)
    assert store.get_run("r1").status == "finished"  # type: ignore[union-attr]


def test_a_file_uploaded_after_its_writer_was_declared_lost_does_not_revive_it(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.open_run(SPEC, "killed", now=1.0)
    store.mark_crashed("r1", now=2.0)  # the heartbeat timed out: the trainer is gone
    store.open_run(SPEC, "killed", now=3.0, replay=True)  # its file, synced
    assert store.get_run("r1").status == "crashed"  # type: ignore[union-attr]
    assert store.running_runs() == []
    store.open_run(SPEC, "killed", now=4.0)  # the trainer itself, back: revived
    assert store.get_run("r1").status == "running"  # type: ignore[union-attr]
