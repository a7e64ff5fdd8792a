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


def rounds(plain: float, logged: float, spin: float, n: int = 40) -> list[dict[str, float]]:
    # Turn times that wobble alike in every process, as the machine's drift does.
    return [
        {"plain": plain * w, "log": logged * w, "spin": spin * w}
        for w in (1 + 0.01 * (i % 5) for i in range(n))
    ]


ROLES = ("plain", "log", "spin")


def cycle(
    bias: tuple[float, float, float], logs: float, spins: float
) -> list[list[dict[str, float]]]:
    """Three epochs: worker i, of speed bias[i], takes role (i + epoch) % 3."""
    epochs = []
    for epoch in range(3):
        speed = {role: bias[(role_index - epoch) % 3] for role_index, role in enumerate(ROLES)}
        epochs.append(rounds(speed["plain"], speed["log"] * logs, speed["spin"] * spins))
    return epochs


def test_the_lockstep_estimate_cancels_each_processs_own_bias(lockstep: ModuleType) -> None:
    """The processes run 3% and 5% apart whatever they do; logging costs 1%. The
    roles rotate every epoch: the bias cancels out of a whole cycle, not out of an
    epoch."""
    assert lockstep.ROLES == ROLES
    epochs = cycle((1.0, 1.03, 1.05), logs=1.01, spins=1.02)
    assert lockstep.slowdown(epochs[:1], "log") != pytest.approx(1.0, abs=0.5)
    assert lockstep.slowdown(epochs, "log") == pytest.approx(1.0)
    assert lockstep.slowdown(epochs, "spin") == pytest.approx(2.0)


def test_the_scaled_figure_carries_both_readings_noise(lockstep: ModuleType) -> None:
    """A known 1% that reads 2% halves the figure; a reading that moves from one cycle
    to the next widens the interval, though every epoch is steady."""
    steady = cycle((1.0, 1.03, 1.05), logs=1.016, spins=1.02) * 2
    found = lockstep.estimates(steady, 1.0)
    assert found["scaled"] == pytest.approx(0.8)
    assert found["scaled_high"] - found["scaled_low"] == pytest.approx(0.0, abs=1e-9)
    drifting = cycle((1.0, 1.03, 1.05), 1.016, 1.01) + cycle((1.0, 1.03, 1.05), 1.016, 1.03)
    found = lockstep.estimates(drifting, 1.0)
    assert found["spin_low"] == pytest.approx(1.0) and found["spin_high"] == pytest.approx(3.0)
    assert found["scaled_low"] < 0.6 and found["scaled_high"] > 1.5


def test_the_senders_cpu_is_per_step_over_every_logging_turn(lockstep: ModuleType) -> None:
    """The sender's CPU, summed over the logging turns, per step trained in them."""
    epochs = [[{"plain": 1.0, "log": 1.0, "spin": 1.0, "sender": cpu} for cpu in (1e-3, 3e-3)]]
    per_step = 2e-3 / lockstep.STEPS_PER_TURN * 1e6
    assert lockstep.sender_cpu_us(epochs) == pytest.approx(per_step)
