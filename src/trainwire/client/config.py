"""A run's config as the JSON-like data that travels in its hello and is stored.

Scripts hand ``init()`` what they have: a dict, ``vars(args)`` or the
``argparse.Namespace`` itself, a dataclass, a pydantic model, an OmegaConf config,
with numpy and torch scalars among the values. Each is taken as the mapping it
stands for; what has no JSON spelling (a ``torch.device``, a ``Path``) is kept as its
``str()``, and a number as a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Mapping, Sequence, Set as AbstractSet
from typing import Any, Final

import msgspec

from trainwire.exceptions import ConfigError
from trainwire.protocol.limits import MAX_CONFIG_DEPTH, nests_deeper_than

__all__ = ["plain_config"]


def plain_config(config: object) -> dict[str, Any]:
    """``config`` as nested dicts, lists, strings, numbers, bools and None.

    Raises:
        ConfigError: it stands for no mapping (a list, a number), contains itself,
            cannot be read (an OmegaConf value missing), or nests deeper than the
            server takes.
    """
    if config is None:
        return {}
    try:
        mapping = _as_mapping(config)
        top = None if mapping is None else _readable(mapping)
    except Exception as exc:  # noqa: BLE001 - a user's object: its own error, said
        raise ConfigError(f"config cannot be read: {type(exc).__name__}: {exc}") from None
    if top is None:
        raise ConfigError(
            "config must be a mapping, a dataclass, a pydantic model or an object with "
            f"attributes (argparse.Namespace), not {type(config).__name__}"
        )
    try:
        plain: dict[str, Any] = msgspec.to_builtins(top, enc_hook=_builtin, str_keys=True)
    except RecursionError:  # a dict that holds itself, a cycle of dataclasses
        raise ConfigError(
            f"config contains itself, or nests deeper than {MAX_CONFIG_DEPTH} levels"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a key that is no string or number, a
        # mapping whose values cannot be read (OmegaConf's "???", a bad interpolation)
        raise ConfigError(f"config cannot be stored: {exc}") from None
    if nests_deeper_than(plain, MAX_CONFIG_DEPTH):
        # The server would refuse the run's hello, and with it every row of the run.
        raise ConfigError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels")
    return plain


# What stands for a mapping of settings when nested in a config: anything else with
# attributes (a dataset, a logger, an optimizer) is kept as its str(), as before.
# Taken as its attributes it was a copy of the object's innards: megabytes of a
# dataset's file list (a hello past the server's frame limit: the run refused, with
# every row), or a cycle (a logger's parent and manager) that crashed init().
_NAMESPACES: Final = (argparse.Namespace, types.SimpleNamespace)


def _as_mapping(value: object, *, attributes: bool = True) -> Mapping[Any, Any] | None:
    """The mapping a config object stands for; None if it stands for none.
    ``attributes``: any object's own attributes count as one (the config itself: a
    settings object); else only a namespace's (argparse.Namespace, SimpleNamespace).
    Methods are looked up on the type: an object whose ``__getattr__`` answers every
    name, or raises KeyError for those it lacks, is asked nothing it did not define."""
    if isinstance(value, type):
        return None
    if isinstance(value, Mapping):  # dict, OmegaConf's DictConfig, ...
        return value
    if dataclasses.is_dataclass(value):
        fields = dataclasses.fields(value)
        return {f.name: getattr(value, f.name) for f in fields if hasattr(value, f.name)}
    if callable(getattr(type(value), "model_dump", None)):  # pydantic 2
        dumped = value.model_dump()  # type: ignore[attr-defined]
        return dumped if isinstance(dumped, Mapping) else None
    if isinstance(value, _NAMESPACES) or (
        attributes and hasattr(value, "__dict__") and not callable(value)
    ):
        # argparse.Namespace, SimpleNamespace, a plain settings object.
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return None


def _builtin(value: Any) -> Any:
    """msgspec's hook for what it cannot encode itself, nested in a config."""
    try:
        mapping = _as_mapping(value, attributes=False)
        if mapping is not None:
            return _readable(mapping)
        if isinstance(value, (Sequence, AbstractSet)) and not isinstance(
            value, (str, bytes, bytearray)
        ):
            return list(value)  # OmegaConf's ListConfig, a deque, a frozenset subclass
        if callable(getattr(type(value), "item", None)):  # numpy and torch scalars
            try:
                number = value.item()
            except Exception:  # noqa: BLE001 - more than one element: shown as text
                return _text(value)
            if isinstance(number, (bool, int, float, str)):
                return number
    except RecursionError:
        raise
    except Exception:  # noqa: BLE001 - a user's object that fails to be read: its text
        pass
    return _text(value)


def _readable(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """``mapping`` as a dict; a value it cannot give (OmegaConf's "???", an
    interpolation of a missing key) as the name of the error, not the whole config
    lost to it."""
    plain: dict[Any, Any] = {}
    for key in mapping:
        try:
            plain[key] = mapping[key]
        except Exception as exc:  # noqa: BLE001 - whatever the mapping raises
            plain[key] = f"<{type(exc).__name__}>"
    return plain


def _text(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a __str__ that raises
        return f"<{type(value).__name__}>"
