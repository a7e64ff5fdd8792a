"""A run's config as the JSON-like data that travels in its hello and is stored.

Scripts hand ``init()`` what they have: a dict, ``vars(args)`` or the
``argparse.Namespace`` itself, a dataclass, a pydantic model, an OmegaConf config,
with numpy and torch scalars among the values. Each is taken as the mapping it
stands for; what has no JSON spelling (a ``torch.device``, a ``Path``) is kept as its
``str()``, and a number as a number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import msgspec

from trainwire.exceptions import ConfigError
from trainwire.protocol.limits import MAX_CONFIG_DEPTH, nests_deeper_than

__all__ = ["plain_config"]


def plain_config(config: object) -> dict[str, Any]:
    """``config`` as nested dicts, lists, strings, numbers, bools and None.

    Raises:
        ConfigError: it stands for no mapping (a list, a number), or nests deeper
            than the server takes.
    """
    if config is None:
        return {}
    top = _as_mapping(config)
    if top is None:
        raise ConfigError(
            "config must be a mapping, a dataclass, a pydantic model or an object with "
            f"attributes (argparse.Namespace), not {type(config).__name__}"
        )
    try:
        plain: dict[str, Any] = msgspec.to_builtins(top, enc_hook=_builtin, str_keys=True)
    except (TypeError, ValueError) as exc:  # a key that is no string or number
        raise ConfigError(f"config cannot be stored: {exc}") from None
    if nests_deeper_than(plain, MAX_CONFIG_DEPTH):
        # The server would refuse the run's hello, and with it every row of the run.
        raise ConfigError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels")
    return plain


def _as_mapping(value: object, *, attributes: bool = True) -> Mapping[Any, Any] | None:
    """The mapping a config object stands for; None if it stands for none.
    ``attributes``: an object's own attributes count as one (argparse.Namespace)."""
    if isinstance(value, type):
        return None
    if isinstance(value, Mapping):  # dict, OmegaConf's DictConfig, ...
        return value
    if dataclasses.is_dataclass(value):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)  # pydantic 2
    if callable(dump):
        dumped = dump()
        return dumped if isinstance(dumped, Mapping) else None
    if attributes and hasattr(value, "__dict__") and not callable(value):
        # argparse.Namespace, SimpleNamespace, a plain settings object.
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return None


def _builtin(value: Any) -> Any:
    """msgspec's hook for what it cannot encode itself, nested in a config."""
    mapping = _as_mapping(value, attributes=False)
    if mapping is not None:
        return dict(mapping)
    item = getattr(value, "item", None)  # numpy and torch scalars, one-element arrays
    if callable(item):
        try:
            number = item()
        except Exception:  # noqa: BLE001 - more than one element: shown as text
            return str(value)
        if isinstance(number, (bool, int, float, str)):
            return number
        return str(value)
    mapping = _as_mapping(value)  # a namespace within the config
    return str(value) if mapping is None else dict(mapping)
