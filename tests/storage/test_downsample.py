"""Min/max downsampling against a brute-force reference: no extreme may vanish."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from hypothesis import example, given, settings, strategies as st

from trainwire.storage.downsample import bucket_count, downsample

special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0])
values = st.one_of(st.floats(min_value=-1e6, max_value=1e6), special)


@st.composite
def series(draw: st.DrawFn) -> tuple[list[int], list[float], int, int, int]:
    """Sorted steps (repeats allowed), their values, a range around them, and points.
    Half the series hold only a few distinct values, so that ties, all-NaN buckets and
    buckets whose only real values are infinite come up often."""
    steps = sorted(draw(st.lists(st.integers(-50, 400), min_size=1, max_size=300)))
    pick = draw(st.sampled_from([values, special]))
    logged = draw(st.lists(pick, min_size=len(steps), max_size=len(steps)))
    start = steps[0] - draw(st.integers(0, 30))
    end = steps[-1] + draw(st.integers(0, 30))
    points = draw(st.integers(2, 80))
    return steps, logged, start, end, points


def arrays(
    steps: list[int], logged: list[float]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    # Times number the points, so that each output point names the input point it is.
    times = np.arange(len(steps), dtype=np.float64)
    return np.array(steps, dtype=np.int64), times, np.array(logged, dtype=np.float64)


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@settings(max_examples=300, deadline=None)
@given(series())
# A NaN before the bucket's only real value, +Infinity: the minimum is +Infinity.
@example(([0, 1, 2], [math.nan, math.inf, math.inf], 0, 2, 2))
def test_every_bucket_keeps_its_extremes_and_nothing_is_made_up(
    case: tuple[list[int], list[float], int, int, int],
) -> None:
    steps, logged, start, end, points = case
    out = downsample(*arrays(steps, logged), points=points, start=start, end=end)
    kept = [int(t) for t in out.times]
    # A subset of the input, in input order (so sorted by step), each point whole.
    assert kept == sorted(set(kept))
    assert [steps[i] for i in kept] == out.steps.tolist()
    assert all(same(logged[i], v) for i, v in zip(kept, out.values.tolist(), strict=True))
    if len(steps) <= points:
        assert not out.sampled and kept == list(range(len(steps)))
        return
    assert out.sampled and len(kept) <= points
    # From 4 points on, the first and the last point (the newest value) are kept too.
    ends = {0, len(steps) - 1} if points >= 4 else set()
    assert ends <= set(kept)

    # The reference: buckets by brute force, as the docstring defines them.
    buckets = bucket_count(points)
    assert 2 * buckets + len(ends) <= max(points, 2 * buckets)
    members: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        members.setdefault((step - start) * buckets // (end - start + 1), []).append(i)
    assert all(0 <= b < buckets for b in members)
    for bucket, indices in members.items():
        chosen = [i for i in kept if i in indices]
        extremes = [i for i in chosen if i not in ends]  # an end may be one as well
        assert 1 <= len(chosen) and len(extremes) <= 2, (bucket, chosen)
        real = [i for i in indices if not math.isnan(logged[i])]
        if not real:  # only NaN: the first point shows the gap
            assert indices[0] in chosen and set(extremes) <= {indices[0]}
            continue
        lowest = min(logged[i] for i in real)
        highest = max(logged[i] for i in real)
        assert any(logged[i] == lowest for i in chosen), (bucket, lowest, chosen)
        assert any(logged[i] == highest for i in chosen), (bucket, highest, chosen)
        assert all(not math.isnan(logged[i]) for i in extremes)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=3, max_size=100),
    st.data(),
)
def test_steps_spread_over_the_whole_int64_range_still_keep_the_extremes(
    raw_steps: list[int], data: st.DataObject
) -> None:
    steps = sorted(raw_steps)
    logged = data.draw(st.lists(values, min_size=len(steps), max_size=len(steps)))
    out = downsample(*arrays(steps, logged), points=2, start=-(2**63), end=2**63 - 1)
    kept = [int(t) for t in out.times]
    assert kept == sorted(set(kept)) and len(kept) <= 2
    real = [v for v in logged if not math.isnan(v)]
    if real:  # one bucket: its extremes are the series'
        assert min(real) in out.values.tolist() and max(real) in out.values.tolist()


def test_a_million_points_come_down_to_the_requested_number_with_the_spikes() -> None:
    n = 1_000_000
    steps = np.arange(n, dtype=np.int64)
    logged = np.sin(steps / 1000.0)
    logged[123_457] = 50.0
    logged[765_432] = -math.inf
    logged[500_000:500_010] = math.nan
    out = downsample(steps, steps.astype(np.float64), logged, points=1000, start=0, end=n - 1)
    assert out.sampled and len(out.steps) <= 1000
    assert {0, 123_457, 765_432, n - 1} <= set(out.steps.tolist())
    assert np.all(np.diff(out.steps) > 0)
