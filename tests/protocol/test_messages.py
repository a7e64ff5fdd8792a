from __future__ import annotations

import json
import math

import pytest

from trainwire.exceptions import ProtocolError
from trainwire.protocol.batching import Backoff
from trainwire.protocol.columns import series_from_rows, spelled
from trainwire.protocol.messages import (
    Points,
    Series,
    Subscribe,
    Unsubscribe,
    decode_dashboard_message,
    encode_json,
    json_value,
)


def test_non_finite_values_are_spelled_as_javascript_does() -> None:
    assert [json_value(v) for v in (1.5, math.nan, math.inf, -math.inf)] == [
        1.5,
        "NaN",
        "Infinity",
        "-Infinity",
    ]


def test_rows_become_columns_per_key_with_json_spelling() -> None:
    rows = [(0, 10.0, {"a": 1.0, "b": math.nan}), (1, 11.0, {"a": math.inf})]
    series = spelled(series_from_rows(rows))
    assert series == {
        "a": Series(step=[0, 1], time=[10.0, 11.0], value=[1.0, "Infinity"]),
        "b": Series(step=[0], time=[10.0], value=["NaN"]),
    }
    frame = json.loads(encode_json(Points(run="r", seq=3, series=series)))
    assert frame["type"] == "points" and frame["series"]["b"]["value"] == ["NaN"]


def test_dashboard_messages_decode_and_bad_ones_say_why() -> None:
    assert decode_dashboard_message('{"type":"subscribe","run":"r","after":4}') == Subscribe("r", 4)
    assert decode_dashboard_message(b'{"type":"unsubscribe","run":"r"}') == Unsubscribe("r")
    with pytest.raises(ProtocolError, match="Invalid value 'dance'"):
        decode_dashboard_message('{"type":"dance"}')
    with pytest.raises(ProtocolError, match="bad dashboard message: Input data was truncated"):
        decode_dashboard_message("{")
    with pytest.raises(ProtocolError, match=r"Expected `int`, got `str` - at `\$.after`"):
        decode_dashboard_message('{"type":"subscribe","run":"r","after":"x"}')
    with pytest.raises(ProtocolError, match=r"Expected `int` >= 0 - at `\$.after`"):
        decode_dashboard_message('{"type":"subscribe","run":"r","after":-1}')


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(base=0.1, cap=1.0)
    highs = [backoff.next_delay(lambda: 0.999) for _ in range(8)]
    assert highs[0] == pytest.approx(0.0999, abs=1e-3)
    assert highs == sorted(highs) and highs[-1] == pytest.approx(1.0, abs=1e-3)
    assert backoff.next_delay(lambda: 0.0) == pytest.approx(0.5)  # never below half
    backoff.reset()
    assert backoff.next_delay(lambda: 0.0) == pytest.approx(0.05)


def test_backoff_survives_thousands_of_attempts() -> None:
    backoff = Backoff(cap=5.0)
    for _ in range(5000):
        delay = backoff.next_delay(lambda: 0.5)
    assert delay == pytest.approx(3.75)


def test_spelling_leaves_finite_columns_alone_and_spells_the_rest() -> None:
    finite = Series(step=[0, 1], time=[0.0, 1.0], value=[1.5, 1e308])
    overflowing = Series(step=[0, 1], time=[0.0, 1.0], value=[1e308, 1e308])  # sum is inf
    mixed = Series(step=[0, 1, 2], time=[0.0] * 3, value=[math.nan, 2.0, -math.inf])
    spelled({"a": finite, "b": overflowing, "c": mixed})
    assert finite.value == [1.5, 1e308] and overflowing.value == [1e308, 1e308]
    assert mixed.value == ["NaN", 2.0, "-Infinity"]
    spelled({"c": mixed})  # spelling twice changes nothing
    assert mixed.value == ["NaN", 2.0, "-Infinity"]
