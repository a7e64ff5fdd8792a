"""``trainwire demo`` against a real server: one short epoch, every metric stored."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from tests.conftest import TOKEN  # noqa: E402
from trainwire import demo  # noqa: E402
from trainwire.demo import run_demo  # noqa: E402


def test_one_epoch_streams_every_metric(
    live_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(epochs=1, url=live_server.url) == 0

    [run] = live_server.store.list_runs()
    assert (run.project, run.name, run.status) == ("digits-demo", "cnn-lr0.003", "finished")
    assert run.config["epochs"] == 1
    out = capsys.readouterr().out
    assert out.startswith(f"Dashboard: {live_server.url}/?run={run.id}&token={TOKEN}\n")

    _, series = live_server.store.metrics(run.id)
    steps = run.config["train_size"] // run.config["batch_size"]
    for key in ("train/loss", "train/acc", "lr"):
        assert series[key].step == list(range(1, steps + 1)), key
    for key in ("val/loss", "val/acc"):
        assert series[key].step == [steps], key
    assert all(math.isfinite(v) for v in series["train/loss"].value)
    assert len(set(series["lr"].value)) > 1, "the lr schedule should move"
    assert 0.0 <= series["val/acc"].value[0] <= 1.0


def test_ctrl_c_ends_the_run_and_exits_130(
    live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(run: Any, data: Any, epochs: int) -> tuple[float, float]:
        run.log({"train/loss": 1.0}, step=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train", interrupted)
    assert run_demo(epochs=1, url=live_server.url) == 130

    [run] = live_server.store.list_runs()
    assert run.status == "crashed"
    _, series = live_server.store.metrics(run.id)
    assert series["train/loss"].step == [1]


def test_missing_dependencies_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    assert run_demo(epochs=1, url="http://127.0.0.1:9") == 1
    err = capsys.readouterr().err
    assert "sklearn" in err
    assert "pip install 'trainwire[demo]'" in err


def test_epochs_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(epochs=0, url="http://127.0.0.1:9") == 2
    assert "--epochs" in capsys.readouterr().err
