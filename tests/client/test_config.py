"""A run's config, from what scripts really pass to init()."""

from __future__ import annotations

import argparse
import dataclasses
import types
from pathlib import Path

import pytest

from trainwire.client.config import plain_config
from trainwire.exceptions import ConfigError


@dataclasses.dataclass
class Optimizer:
    name: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class Experiment:
    lr: float = 3e-3
    optimizer: Optimizer = dataclasses.field(default_factory=Optimizer)


def test_an_argparse_namespace_is_taken_as_its_arguments() -> None:
    """``init(config=args)``: the idiom of most training scripts. It raised a bare
    TypeError from init()."""
    args = argparse.Namespace(lr=0.1, data=Path("/data/digits"), nested=types.SimpleNamespace(a=1))
    assert plain_config(args) == {"lr": 0.1, "data": "/data/digits", "nested": {"a": 1}}


def test_a_dataclass_is_taken_as_its_fields_nested_ones_too() -> None:
    assert plain_config(Experiment()) == {
        "lr": 3e-3,
        "optimizer": {"name": "adam", "betas": (0.9, 0.999)},
    }


def test_a_pydantic_like_model_is_taken_as_its_dump() -> None:
    class Model:
        def model_dump(self) -> dict[str, object]:
            return {"epochs": 3}

    assert plain_config({"model": Model()}) == {"model": {"epochs": 3}}
    assert plain_config(Model()) == {"epochs": 3}


def test_numpy_and_torch_scalars_stay_numbers_and_the_rest_is_text() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    config = {
        "np": np.float32(0.5),
        "int": np.int64(7),
        "t": torch.tensor(1.5),
        "device": torch.device("cpu"),
        "weights": np.arange(3),
        7: {"set": {2}},
    }
    assert plain_config(config) == {
        "np": 0.5,
        "int": 7,
        "t": 1.5,
        "device": "cpu",
        "weights": "[0 1 2]",
        "7": {"set": [2]},
    }


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ([("lr", 0.1)], "config must be a mapping"),
        (0.1, "config must be a mapping"),
        ({(1, 2): 3}, "config cannot be stored"),
    ],
    ids=["list", "number", "tuple-key"],
)
def test_a_config_that_stands_for_no_mapping_is_a_config_error(
    config: object, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        plain_config(config)


def test_init_takes_the_namespace_of_a_script_as_its_config() -> None:
    import trainwire

    args = argparse.ArgumentParser().parse_args([])
    args.lr = 0.1
    run = trainwire.init(config=args, mode="offline")
    run.finish()
    assert run._sender.session.run.config == {"lr": 0.1}
