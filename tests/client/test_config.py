"""A run's config, from what scripts really pass to init()."""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import types
from pathlib import Path
from typing import Any

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


class ListLike(collections.abc.Sequence):  # type: ignore[type-arg]
    """As OmegaConf's ListConfig: a sequence, its state in private attributes."""

    def __init__(self, *items: object) -> None:
        self._content = list(items)

    def __getitem__(self, index: Any) -> Any:
        return self._content[index]

    def __len__(self) -> int:
        return len(self._content)


class Missing(collections.abc.Mapping):  # type: ignore[type-arg]
    """As OmegaConf's DictConfig with a "???" value: reading it raises."""

    def __iter__(self) -> Any:
        return iter(["lr", "data"])

    def __len__(self) -> int:
        return 2

    def __getitem__(self, key: str) -> Any:
        if key == "data":
            raise LookupError("Missing mandatory value: data")
        return 0.1


def test_a_list_like_sequence_nested_in_a_config_is_a_list_not_an_empty_dict() -> None:
    """A Hydra config's lists (ListConfig) came out as {}: taken as an object whose
    attributes, all private, were none."""
    assert plain_config({"layers": ListLike(64, ListLike(1, 2))}) == {"layers": [64, [1, 2]]}


def test_a_mapping_value_that_cannot_be_read_costs_that_value_only() -> None:
    assert plain_config(Missing()) == {"lr": 0.1, "data": "<LookupError>"}
    assert plain_config({"cfg": Missing()}) == {"cfg": {"lr": 0.1, "data": "<LookupError>"}}


def test_omegaconf_lists_and_interpolations() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {"lr": 0.1, "layers": [64, 128], "model": {"lr": "${lr}"}, "data": "???"}
    )
    assert plain_config(cfg) == {
        "lr": 0.1,
        "layers": [64, 128],
        "model": {"lr": 0.1},
        "data": "<MissingMandatoryValue>",
    }


class Dataset:
    def __init__(self) -> None:
        self.root = "/data"
        self.files = [f"/data/{i:07d}.png" for i in range(100_000)]


class AttrConfig:
    """Its __getattr__ raises KeyError for a name it lacks (a common wrapper)."""

    def __init__(self) -> None:
        self._values = {"lr": 0.1}

    def __getattr__(self, name: str) -> Any:
        return self._values[name]


def test_an_object_nested_in_a_config_is_its_text_not_a_copy_of_its_innards() -> None:
    """A dataset, a logger, an optimizer put in a config were expanded attribute by
    attribute: megabytes of file names (a hello past the server's frame limit, and
    the run refused with every row), or a cycle (a logger's parent) that crashed
    init() with a RecursionError. Before, and again, each is its str()."""
    import logging

    dataset, logger = Dataset(), logging.getLogger("trainwire.test")
    config = plain_config({"data": dataset, "log": logger, "attrs": AttrConfig()})
    assert config["data"] == str(dataset)
    assert config["log"] == str(logger)
    assert config["attrs"].startswith("<")
    # What stands for settings, nested, is still taken as such.
    assert plain_config({"ns": types.SimpleNamespace(a=1)}) == {"ns": {"a": 1}}


def test_a_config_that_contains_itself_is_a_config_error() -> None:
    config: dict[str, Any] = {"lr": 0.1}
    config["self"] = config
    with pytest.raises(ConfigError, match="contains itself"):
        plain_config(config)


def test_an_object_that_cannot_be_read_is_a_config_error_or_its_text() -> None:
    class Unreadable:
        @property
        def __dict__(self) -> Any:  # type: ignore[override]
            raise RuntimeError("no attributes")

        def __str__(self) -> str:
            raise RuntimeError("no text")

    with pytest.raises(ConfigError, match="cannot be read"):
        plain_config(Unreadable())
    assert plain_config({"x": Unreadable()}) == {"x": "<Unreadable>"}
