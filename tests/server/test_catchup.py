"""A dashboard's catch-up cut into parts (trainwire.server.catchup): pure."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from trainwire.server.catchup import parts
from trainwire.storage.base import CommittedColumns


def columns_of(points: list[tuple[int, str, int]]) -> dict[str, CommittedColumns]:
    """(commit, key, step) in commit order -> per key columns, each value its step."""
    out = {}
    for key in sorted({k for _, k, _ in points}):
        mine = [(q, s) for q, k, s in points if k == key]
        steps = np.array([s for _, s in mine], dtype=np.int64)
        commits = np.array([q for q, _ in mine], dtype=np.int64)
        out[key] = CommittedColumns(steps, steps * 0.5, steps.astype(np.float64), commits)
    return out


# Commits 1..n, each with some points of keys "a" to "c".
commits_strategy = st.lists(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 10**6)), min_size=1, max_size=30),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(commits_strategy, st.integers(1, 60), st.integers(0, 5))
def test_parts_hold_every_point_once_in_order_cut_between_commits(
    batches: list[list[tuple[str, int]]], limit: int, more: int
) -> None:
    points = [(q, key, step) for q, batch in enumerate(batches, 1) for key, step in batch]
    last_seq = len(batches) + more  # later commits may hold other runs' keys only
    got = list(parts(columns_of(points), last_seq, limit))

    seqs = [seq for seq, _ in got]
    assert seqs == sorted(set(seqs)) and seqs[-1] == last_seq
    rebuilt: dict[str, list[int]] = {}
    since = 0
    for seq, series in got:
        values = sum(len(s.step) for s in series.values())
        commits_in = {q for q, k, s in points if since < q <= seq}
        # Whole commits only, within the limit unless one commit alone is over it.
        assert values == sum(1 for q, _, _ in points if q in commits_in)
        assert values <= limit or len(commits_in) == 1
        for key, s in series.items():
            assert s.value == [float(x) for x in s.step] and s.time == [x * 0.5 for x in s.step]
            rebuilt.setdefault(key, []).extend(s.step)
        since = seq
    expected: dict[str, list[int]] = {}
    for _, key, step in points:
        expected.setdefault(key, []).append(step)
    assert rebuilt == expected


def test_no_points_is_one_empty_part_at_the_runs_seq() -> None:
    assert list(parts({}, 7)) == [(7, {})]


def test_a_catch_up_of_millions_of_points_comes_in_parts_of_the_default_size() -> None:
    n = 1_000_000
    steps = np.arange(n, dtype=np.int64)
    commits = steps // 1000 + 1  # 1,000 commits of 1,000 points
    got = parts({"loss": CommittedColumns(steps, steps * 1.0, steps * 1.0, commits)}, 1000)
    sizes = [len(series["loss"].step) for _, series in got]
    assert sizes == [50_000] * 20
