from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from trainwire.client import spool
from trainwire.client.spool import MAGIC, SpillingOutbox, new_header
from trainwire.exceptions import ConfigError
from trainwire.protocol.messages import Batch, Finish, RunSpec

SPEC = RunSpec(id="r", project="p", name="n")


def batch(seq: int, rows: int = 2) -> Batch:
    return Batch(seq=seq, rows=[(seq, 0.0, {"x": float(i)}) for i in range(rows)])


def outbox(tmp_path: Path, memory_rows: int = 4, **kwargs: object) -> SpillingOutbox:
    return SpillingOutbox(
        tmp_path / "run" / "s.twrun",
        new_header(SPEC, "s", None),
        memory_rows=memory_rows,
        disk_bytes=kwargs.pop("disk_bytes", 1 << 20),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def test_items_past_the_memory_bound_go_to_the_file_and_come_back_in_order(
    tmp_path: Path,
) -> None:
    box = outbox(tmp_path)
    for seq in range(1, 6):
        box.append(batch(seq))
    assert box.spilling and box.spilled == 3 and box.rows == 10 and len(box) == 5
    assert [i.seq for i in box.items(1, 10)] == [1, 2, 3, 4, 5]
    assert [i.seq for i in box.items(2, 2)] == [2, 3]
    assert [i.seq for i in box.items(4, 10)] == [4, 5]
    assert box.items(4, 10)[0] == batch(4)
    box.close()
    assert box.path.exists()  # undelivered items stay on disk, for trainwire sync


def test_once_spilling_new_items_follow_on_disk_until_it_drains(tmp_path: Path) -> None:
    box = outbox(tmp_path)
    for seq in range(1, 4):
        box.append(batch(seq))
    box.drop_through(2)  # memory has room again, but the file is not drained
    box.append(batch(4))
    assert box.spilled == 2
    box.drop_through(4)
    assert not box.spilling and box.rows == 0
    box.append(batch(5))  # drained: back to memory, the file started over
    assert box.spilled == 2 and box.path.stat().st_size < 100
    box.close()
    assert not box.path.exists()


def test_the_file_never_grows_past_its_bound(tmp_path: Path) -> None:
    box = outbox(tmp_path, memory_rows=0, disk_bytes=400)
    seq = 1
    while box.accepts(batch(seq)):
        box.append(batch(seq))
        seq += 1
    assert seq > 2
    one_batch = 4 + len(msgspec.msgpack.encode(batch(seq)))
    finish = 4 + len(msgspec.msgpack.encode(Finish(seq=seq)))
    assert 400 - one_batch - 2 * finish < box.path.stat().st_size <= 400 - finish
    box.append(Finish(seq=seq))  # the run's end is never refused: there is room for it
    assert box.path.stat().st_size <= 400
    box.close()


def test_the_bound_holds_once_what_was_in_memory_is_persisted_too(tmp_path: Path) -> None:
    """finish() with the server away writes the oldest items, held in memory, to the
    file as well: the bound kept room for them."""
    box = outbox(tmp_path, memory_rows=8, disk_bytes=800)
    seq = 1
    while box.accepts(batch(seq)):
        box.append(batch(seq))
        seq += 1
    assert box.spilling and box.spilled == seq - 1 - 4  # four items are in memory
    box.drop_through(1)  # the server acknowledged one before it went away
    box.append(Finish(seq=seq))
    box.persist()
    assert box.path.stat().st_size <= 800
    assert [item.seq for item in box.items(2, 100)] == list(range(2, seq + 1))
    box.close()


def spilled_outbox(tmp_path: Path) -> tuple[SpillingOutbox, list[Batch]]:
    """Items 1-4 in memory, 5-12 on disk, none acknowledged."""
    box = outbox(tmp_path, memory_rows=8)
    items = [batch(seq) for seq in range(1, 13)]
    for item in items:
        box.append(item)
    assert box.spilled == 8
    return box, items


def test_persisting_puts_the_items_in_memory_first_and_reads_back_whole(
    tmp_path: Path,
) -> None:
    box, items = spilled_outbox(tmp_path)
    box.append(Finish(seq=13))
    box.persist()
    assert [item.seq for item in box.items(1, 100)] == list(range(1, 14))
    box.append(batch(14))  # still writable after the file was replaced
    box.close()
    assert box.path.exists() and not box.path.with_name("s.twrun.partial").exists()
    again = SpillingOutbox.open_existing(box.path)
    assert again.items(1, 100) == [*items, Finish(seq=13), batch(14)]
    assert again.header == new_header(SPEC, "s", None) and again.rows == 26
    again.close()


def test_persisting_copies_the_records_on_disk_without_decoding_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file near its bound holds millions of rows: decoded, they took about eight
    times its size in memory, at the end of a long outage."""
    box, _ = spilled_outbox(tmp_path)

    class Refusing:
        def decode(self, data: bytes) -> object:
            raise AssertionError("persist() decoded a record from the file")

    monkeypatch.setattr(spool, "_item_decoder", Refusing())
    box.persist()
    monkeypatch.undo()
    assert [item.seq for item in box.items(1, 100)] == list(range(1, 13))
    box.close()


def test_a_failure_while_persisting_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box, items = spilled_outbox(tmp_path)

    def failing(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(spool.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        box.persist()
    assert box.items(1, 100) == items  # what was in memory is still there
    assert not box.path.with_name("s.twrun.partial").exists()
    box.close()
    again = SpillingOutbox.open_existing(box.path)
    assert again.items(1, 100) == items[4:]  # what was on disk, untouched
    again.close()


def test_a_kept_file_reads_back_with_its_header_and_items(tmp_path: Path) -> None:
    box = outbox(tmp_path, memory_rows=0, keep=True)
    for seq in range(1, 4):
        box.append(batch(seq))
    box.append(Finish(seq=4))
    box.drop_through(4)  # kept files are never truncated
    box.close()
    again = SpillingOutbox.open_existing(box.path)
    assert again.header == new_header(SPEC, "s", None)
    assert (again.first_seq, again.last_seq, again.rows) == (1, 4, 6)
    assert again.items(1, 10) == [batch(1), batch(2), batch(3), Finish(seq=4)]
    again.close()


def test_a_record_cut_short_by_a_crash_is_left_out(tmp_path: Path) -> None:
    box = outbox(tmp_path, memory_rows=0, keep=True)
    for seq in range(1, 4):
        box.append(batch(seq))
    box.close()
    data = box.path.read_bytes()
    box.path.write_bytes(data[:-5])
    again = SpillingOutbox.open_existing(box.path)
    assert [i.seq for i in again.items(1, 10)] == [1, 2]
    again.close()


def test_a_file_that_is_not_a_run_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.twrun"
    path.write_bytes(b"hello")
    with pytest.raises(ConfigError, match="not a trainwire run file"):
        SpillingOutbox.open_existing(path)


def test_persist_keeps_a_finish_that_is_the_only_item_left(tmp_path: Path) -> None:
    """Every batch acknowledged, then the server gone before the run's end: the end
    (no rows) must reach the file, or the run loses its status and sync has nothing."""
    box = outbox(tmp_path)
    box.append(batch(1))
    box.drop_through(1)
    box.append(Finish(seq=2))
    box.persist()
    box.close()
    again = SpillingOutbox.open_existing(box.path)
    try:
        assert again.items(1, 10) == [Finish(seq=2)]
    finally:
        again.close()


def test_a_zero_filled_tail_left_by_a_crash_is_left_out(tmp_path: Path) -> None:
    """After a power cut a file system may keep a file's new size but not the data
    written into it: the tail reads as zeros, a length prefix of 0. The records
    before it are whole and must read back (and `trainwire sync` must not traceback)."""
    box = outbox(tmp_path, memory_rows=0, keep=True)
    for seq in range(1, 4):
        box.append(batch(seq))
    box.close()
    with box.path.open("ab") as handle:
        handle.write(bytes(4096))
    again = SpillingOutbox.open_existing(box.path)
    assert [i.seq for i in again.items(1, 10)] == [1, 2, 3]
    again.close()


@pytest.mark.parametrize("big_head", [False, True])
def test_a_file_whose_newest_item_is_never_acknowledged_in_time_still_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, big_head: bool
) -> None:
    """Once spilled, new items follow on disk until it drains. A loop that logs at
    every flush always has its newest batch unacknowledged when the sender reads
    acks, so the file never drained: it grew by everything logged after the outage,
    with the server up and acking, until max_disk_bytes refused new points. The
    acknowledged head is cut off: at the bound (big_head False) or, before it, once it
    outweighs the rest and passes _COMPACT_BYTES (here made small)."""
    if big_head:
        monkeypatch.setattr(spool, "_COMPACT_BYTES", 300)
    box = outbox(tmp_path, memory_rows=4, disk_bytes=1500)
    for seq in range(1, 5):  # the outage: spilled past the 4 rows held in memory
        assert box.accepts(batch(seq))
        box.append(batch(seq))
    sizes = []
    for seq in range(5, 400):  # the server is back: each ack leaves the newest item
        assert box.accepts(batch(seq)), seq
        box.append(batch(seq))
        box.drop_through(seq - 1)
        sizes.append(box.path.stat().st_size)
        assert [i.seq for i in box.items(1, 10)] == [seq]
    assert max(sizes) <= 1500
    if big_head:
        assert max(sizes[50:]) < 600  # cut off long before the bound
    box.close()
    # Rewritten whole: it reads back, the undelivered item last (any acknowledged ones
    # before it are resent by `trainwire sync` and ignored by the server).
    again = SpillingOutbox.open_existing(box.path)
    read = [i.seq for i in again.items(1, 400)]
    assert read == list(range(read[0], 400)) and len(read) < 40
    again.close()


def test_a_file_at_its_bound_is_not_rewritten_whole_at_every_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file at its bound (1 GiB by default), the server back but acknowledging
    about as fast as the loop logs (a slow link, a busy server): at each flush the
    batch does not fit, a half batch does once one batch is acknowledged, and
    accepts() rewrites every unacknowledged byte (and fsyncs it) to free that one
    batch. Before compaction the rows were dropped; now the sender copies the whole
    file at every flush, for as long as it lasts. The copying must stay within a few
    times what it frees."""
    from trainwire.protocol.session import ClientSession

    disk_bytes = 200_000
    box = outbox(tmp_path, memory_rows=0, disk_bytes=disk_bytes)
    copied: list[int] = []
    rewrite = SpillingOutbox._rewrite

    def counting(self: SpillingOutbox, held: list[Batch], path: Path) -> object:
        result = rewrite(self, held, path)  # type: ignore[arg-type]
        copied.append(path.stat().st_size)
        return result

    monkeypatch.setattr(SpillingOutbox, "_rewrite", counting)
    session = ClientSession(SPEC, stream="s", outbox=box, rows_per_batch=50)
    rows = [(0, 0.0, {"x": float(i)}) for i in range(50)]
    session.add_rows(rows)
    while session.cut_batches():  # the outage: up to the bound
        session.add_rows(rows)
    session.drop_oldest_pending(session.queued_rows)
    acked = 0
    for _ in range(100):  # back: a batch acknowledged per flush, a batch logged
        acked += 1
        box.drop_through(acked)
        session.add_rows(rows)
        if not session.cut_batches():
            session.drop_oldest_pending(session.queued_rows)  # as Sender._cut does
    assert box.path.stat().st_size <= disk_bytes
    box.close()
    assert sum(copied) <= 4 * disk_bytes, (len(copied), sum(copied))


# -- rows held too long (Sender._spill_stale) ---------------------------------------


def test_held_since_is_when_the_oldest_item_still_in_memory_was_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([10.0, 11.0, 12.0])
    monkeypatch.setattr(spool.time, "monotonic", lambda: next(clock))
    box = outbox(tmp_path, memory_rows=100)
    assert box.held_since is None
    for seq in range(1, 4):
        box.append(batch(seq))
    assert box.held_since == 10.0
    box.drop_through(2)
    assert box.held_since == 12.0
    box.drop_through(3)
    assert box.held_since is None
    box.close()


def test_items_held_too_long_move_to_the_file_and_later_ones_follow_until_it_drains(
    tmp_path: Path,
) -> None:
    box = outbox(tmp_path, memory_rows=100)
    for seq in range(1, 4):
        box.append(batch(seq))
    assert not box.spilling
    box.spill_held()
    assert box.spilling and box.held_since is None and box.rows == 6
    box.append(batch(4))  # with room in memory, but newer than the file: to the file
    assert box.spilled == 4 and box.items(1, 10) == [batch(s) for s in range(1, 5)]
    box.close()  # as a killed process leaves it: every item on disk, in order
    again = SpillingOutbox.open_existing(tmp_path / "run" / "s.twrun")
    assert again.items(1, 10) == [batch(s) for s in range(1, 5)]
    again.close()


def test_a_drained_file_starts_over_and_memory_is_used_again(tmp_path: Path) -> None:
    box = outbox(tmp_path, memory_rows=100)
    box.append(batch(1))
    box.spill_held()
    box.drop_through(1)  # the server has it: the file is emptied
    box.append(batch(2))
    assert not box.spilling and box.spilled == 1 and box.held_since is not None
    box.spill_held()  # the file is written afresh, the acknowledged item not in it
    assert box.items(1, 10) == [batch(2)]
    box.close()
    again = SpillingOutbox.open_existing(tmp_path / "run" / "s.twrun")
    assert again.items(1, 10) == [batch(2)]
    again.close()


def test_items_held_go_before_the_newer_ones_already_on_disk(tmp_path: Path) -> None:
    box, items = spilled_outbox(tmp_path)  # the oldest in memory, the rest on disk
    box.spill_held()
    assert box.held_since is None and box.items(1, 100) == items
    box.close()
    again = SpillingOutbox.open_existing(box.path)
    assert again.items(1, 100) == items
    again.close()


def test_a_failed_move_to_the_file_keeps_the_items_in_memory_and_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = outbox(tmp_path, memory_rows=100)
    box.append(batch(1))
    box.spill_held()
    box.drop_through(1)  # a file with only acknowledged bytes, still open
    size = box.path.stat().st_size
    for seq in range(2, 5):
        box.append(batch(seq))
    real_write_all = spool._write_all

    def half_then_fail(handle: object, data: bytes) -> None:
        real_write_all(handle, data[: len(data) // 2])  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(spool, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        box.spill_held()
    assert not box.spilling and box.items(2, 10) == [batch(s) for s in range(2, 5)]
    assert box.path.stat().st_size <= size  # nothing half-written left behind
    monkeypatch.undo()
    box.spill_held()  # tried again later: all of them, in order
    box.append(batch(5))
    assert box.items(2, 10) == [batch(s) for s in range(2, 6)]
    box.close()
    again = SpillingOutbox.open_existing(box.path)
    assert again.items(2, 10) == [batch(s) for s in range(2, 6)]
    again.close()


def test_files_left_undelivered_are_those_of_ended_writers_of_this_rank(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"

    def run_file(stream: str, rank: int | None, items: int) -> SpillingOutbox:
        box = SpillingOutbox(
            folder / f"{stream}.twrun",
            new_header(SPEC, stream, rank),
            memory_rows=0,
            disk_bytes=1 << 20,
        )
        for seq in range(1, items + 1):
            box.append(batch(seq))
        return box

    run_file("killed", None, 3).close()  # what a killed trainer leaves
    killed = (folder / "killed.twrun").read_bytes()
    header_only = len(MAGIC) + 4 + len(msgspec.msgpack.encode(new_header(SPEC, "killed", None)))
    (folder / "drained.twrun").write_bytes(killed[:header_only])  # killed once delivered
    run_file("rank1", 1, 2).close()  # another rank's: that rank says it
    running = run_file("running", None, 2)  # still written, locked: its trainer delivers it
    (folder / "other.twrun").write_bytes(b"not a run file")
    try:
        assert spool.left_undelivered(folder, None) == [folder / "killed.twrun"]
        assert spool.left_undelivered(folder, 1) == [folder / "rank1.twrun"]
        assert spool.left_undelivered(tmp_path / "absent", None) == []
    finally:
        running.close()
    assert folder / "running.twrun" in spool.left_undelivered(folder, None)
