"""A config's values as text: TOML in and out, ``--set`` values, ``EASGD_*`` variables, and the
type check of every value against the dataclass field it goes into.

config.py decides what the keys are and which source wins (its dataclasses and
:meth:`Config.from_toml`); this module only moves values between text and those dataclasses,
for any dataclass, so it never imports config.py (config.py imports it). Every failure is a
one-line :class:`ConfigError` naming the file, variable or key.

TOML is written by ``tomli-w`` (read by the standard library's ``tomllib``): it escapes every
character a TOML string cannot hold literally, so a run's ``config.toml`` loads back whatever
its strings hold (newlines, control characters, quotes, any unicode).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError

__all__ = [
    "read_toml",
    "load_toml",
    "parse_value",
    "dump_toml",
    "show_value",
    "apply_mapping",
    "environment_values",
    "dotted_keys",
    "flatten",
    "drop_none",
]

#: Variables that name config keys: ``EASGD_TAU``, ``EASGD_DATA__NAME`` (``__`` for ``.``).
_ENV_PREFIX = "EASGD_"


# ---------------------------------------------------------------------------------------------
# TOML text in and out


def read_toml(path: Path) -> dict:
    """The tables of a config file."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    return load_toml(decoded, f"config file {path}")


def load_toml(text: str, what: str) -> dict:
    """The tables of TOML text; ``what`` names it in the error ("the checkpoint's config")."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} is not valid TOML: {exc}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` or environment value: a TOML value (``8``, ``[32, 16]``, ``"a b"``), or the
    text itself when it is not one (``--set data.name=synthetic``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def dump_toml(tables: Mapping[str, Any]) -> str:
    """TOML text of nested tables, keys in the mapping's order (plain keys first, then one
    ``[table]`` each). The mapping must hold no None (TOML has no null: drop them first)."""
    return tomli_w.dumps(tables)


def show_value(value: Any) -> str:
    """One value as TOML writes it, on one line (for messages: ``tau 8 → 2``)."""
    if isinstance(value, list):  # tomli-w puts each item of a list on its own line
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")


# ---------------------------------------------------------------------------------------------
# Values into dataclasses


def apply_mapping(root, values: Mapping[str, Any], source: str) -> None:
    """Set the fields of the dataclass ``root`` (and of the dataclasses it holds) from nested
    tables, checking each value's type; ``source`` names where they came from in errors.
    Unknown keys are errors, with the closest known key as a suggestion."""
    _apply(root, values, source, "", root)


def _apply(obj, values: Mapping[str, Any], source: str, prefix: str, root) -> None:
    by_name = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = prefix + key
        if key not in by_name:
            candidates = [prefix + n for n in by_name]
            hint = difflib.get_close_matches(full, candidates + dotted_keys(root), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{source}: unknown key '{full}'{suggestion}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{full}' must be a table of keys, not {value!r}")
            _apply(current, value, source, full + ".", root)
        else:
            setattr(obj, key, _coerce(full, by_name[key], value, source))


def _coerce(full: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    """Check a value against the field's declared type; ints are accepted for floats."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))

    def bad(expected: str):
        return ConfigError(f"{source}: '{full}' must be {expected}, got {value!r}")

    if kind in ("float", "float | None"):
        if value is None and kind.endswith("None"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in ("str", "str | None"):
        if value is None and kind.endswith("None"):
            return None
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise bad("a list")
        return value
    if kind == "Any":  # number or list of numbers
        items = value if isinstance(value, list) else [value]
        if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
            raise bad("a number or a list of numbers")
        return [float(v) for v in value] if isinstance(value, list) else float(value)
    raise AssertionError(f"unhandled config type {kind} for {full}")


def environment_values(
    environ: Mapping[str, str], keys: Iterable[str]
) -> list[tuple[str, str, str]]:
    """(dotted key, text, variable) for each ``EASGD_*`` variable that names one of ``keys``
    (``EASGD_TAU=8``, ``EASGD_DATA__NAME=synthetic``), in the variables' sorted order; other
    ``EASGD_*`` variables (``EASGD_CUDA_MPI``) are the launcher's, not config keys."""
    known = set(keys)
    found = []
    for name, value in sorted(environ.items()):
        if not name.startswith(_ENV_PREFIX):
            continue
        key = name[len(_ENV_PREFIX) :].lower().replace("__", ".")
        if key in known:
            found.append((key, value, name))
    return found


# ---------------------------------------------------------------------------------------------
# Shapes of the same values


def dotted_keys(obj, prefix: str = "") -> list[str]:
    """Every key of a dataclass and the dataclasses it holds, dotted (``data.name``)."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(dotted_keys(value, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"name": x}}`` → ``{"data.name": x}``."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def drop_none(d: dict) -> dict:
    """The nested dict without its None values (keys left unset)."""
    return {k: (drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}
