"""The benchmarks' verdicts (``bench/_common.py``): a figure nearer its target than
the noise of its method is neither a pass nor a shortfall."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_common", BENCH / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("value", "noise", "verdict"),
    [
        (0.5, None, "pass"),
        (1.5, None, "falls short"),
        (0.5, 0.33, "pass"),  # 0.5 below the limit: more than the noise
        (1.5, 0.33, "falls short"),
        (0.9, 0.33, "unresolved"),  # within the noise of the limit, either side
        (1.2, 0.33, "unresolved"),
        (3.1, 15.6, "unresolved"),  # a 15% spread cannot tell 3% from 1%
    ],
)
def test_a_lower_is_better_figure(
    common: ModuleType, value: float, noise: float | None, verdict: str
) -> None:
    check = common.Check("slowdown", value, "%", 1.0, noise=noise)
    assert check.verdict == verdict
    assert check.as_dict()["verdict"] == verdict
    assert check.passed == (value <= 1.0)  # "pass" in the JSON stays the bare comparison


def test_a_floor_within_its_target_is_only_consistent_with_it(common: ModuleType) -> None:
    assert common.Check("floor", 0.5, "%", 1.0, noise=0.3, floor=True).verdict == "consistent"
    assert common.Check("floor", 1.5, "%", 1.0, noise=0.3, floor=True).verdict == "falls short"
    assert common.Check("floor", 0.9, "%", 1.0, noise=0.3, floor=True).verdict == "unresolved"


def test_a_higher_is_better_figure_and_a_missing_one(common: ModuleType) -> None:
    assert common.Check("ingest", 350e3, "points/s", 300e3, "higher", noise=20e3).verdict == "pass"
    assert common.Check("ingest", 310e3, "points/s", 300e3, "higher", noise=20e3).verdict == (
        "unresolved"
    )
    assert common.Check("ingest", None, "points/s", 300e3, "higher", noise=1.0).verdict == (
        "falls short"
    )


@pytest.fixture(scope="module")
def lockstep() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # it imports _common and cpu_overhead by name
    try:
        spec = importlib.util.spec_from_file_location("_bench_lockstep", BENCH / "cpu_lockstep.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def turns(plain: float, logging: float, n: int = 40) -> list[tuple[float, float]]:
    # Turn times that wobble alike in both processes, as the machine's drift does.
    return [(plain * (1 + 0.01 * (i % 5)), logging * (1 + 0.01 * (i % 5))) for i in range(n)]


def test_the_lockstep_estimate_cancels_each_processs_own_bias(lockstep: ModuleType) -> None:
    """Process 1 runs 3% slower whatever it does; logging costs 1%. Who logs swaps
    every epoch: the bias cancels out of the estimate, not out of any one epoch."""
    fast, slow = 1.0, 1.03
    epochs = [turns(fast, slow * 1.01), turns(slow, fast * 1.01)] * 2
    assert lockstep.slowdown(epochs[:1]) == pytest.approx(4.03)
    assert lockstep.slowdown(epochs) == pytest.approx(1.0)


def test_the_scaled_figure_carries_the_calibrations_noise(lockstep: ModuleType) -> None:
    """A known 1% that reads 2% halves the figure; a calibration that varies from
    one role swap to the next widens its interval, though each epoch is steady."""
    logged = [turns(1.0, 1.016), turns(1.0, 1.016)] * 2
    steady = [turns(1.0, 1.02), turns(1.0, 1.02)] * 2
    drifting = [turns(1.0, 1.01), turns(1.0, 1.01), turns(1.0, 1.03), turns(1.0, 1.03)]
    value, low, high = lockstep.scaled_interval(logged, steady, 1.0)
    assert value == pytest.approx(0.8) and high - low == pytest.approx(0.0, abs=1e-9)
    value, low, high = lockstep.scaled_interval(logged, drifting, 1.0)
    assert value == pytest.approx(0.8, rel=0.02)
    assert low < 0.6 and high > 1.5  # 1.6% over a known 1% that read 1% or 3%
