"""What every subcommand's arguments share: the parser class, the handler type, and the
``type=`` validators. A validator raises ``argparse.ArgumentTypeError`` (or ``ValueError``),
which the parser turns into one line on stderr and exit status 2.
"""

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from pydantic import ValidationError

from consumer.errors import ConfigError, UsageError
from consumer.settings import ENV_PREFIX, Settings, device_problem, topic_problem

EXIT_USAGE = 2
# A subcommand's implementation: parsed arguments and settings in, exit status out.
Handler = Callable[[argparse.Namespace, Settings], int]
# What ``add_subparsers()`` returns; each command module adds its parsers to it.
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """A validator for integers >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    """A validator for integers from ``low`` to ``high``."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


tcp_port = int_between(0, 65_535)


def positive_float(text: str) -> float:
    """A number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def finite_positive_float(text: str) -> float:
    """A number > 0, not inf."""
    value = _number(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def popularity(text: str) -> float:
    """A popularity on the 0-100 scale (a decision cut)."""
    value = _number(text)
    if not 0 <= value <= 100:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be within 0-100, got {text}")
    return value


def model_version(text: str) -> str:
    """A model version as the artifact takes it (it names Redis keys): not blank, at most 256
    characters, no ':' and no braces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be blank")
    if any(c in text for c in ":{}") or len(text) > 256:
        raise argparse.ArgumentTypeError(f"at most 256 characters, no ':', no braces: {text!r}")
    return text


def device_name(text: str) -> str:
    """A scoring device as POPSCORE_DEVICE takes it."""
    if problem := device_problem(text):
        raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
    return text


def kafka_topic(text: str) -> str:
    """A legal Kafka topic name (the broker refuses others only once a client asks)."""
    if problem := topic_problem(text):
        raise argparse.ArgumentTypeError(f"{problem}: {text!r}")
    return text


def existing_file(text: str) -> Path:
    """A path to a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def existing_dir(text: str) -> Path:
    """A path to a directory that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return path


def writable_dir(text: str) -> Path:
    """A folder that exists, or can be made, and can be written in."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {text}")
    _check_writable(path)
    return path


def cache_dir(text: str) -> Path:
    """A prepared cache (``complete.json`` in it), which training only reads: a read-only
    volume will do. Anything else must be a folder that can be made and written in."""
    path = Path(text)
    if (path / "complete.json").is_file():
        return path
    return writable_dir(text)


def folder_to_fill(text: str) -> Path:
    """A folder of cached files: one that exists is taken as it is (only what is missing gets
    written there, so a read-only copy of a full one will do), else one that can be made."""
    path = Path(text)
    return path if path.is_dir() else writable_dir(text)


def writable_path(text: str) -> Path:
    """A file that can be written: not a folder, in a folder that exists (or can be made) and
    can be written in. Checked before the work whose result it is to hold."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a folder: {text}")
    _check_writable(path.parent)
    return path


def _check_writable(folder: Path) -> None:
    """``folder``, or the nearest of its parents that exists (where it would be made), is a
    folder this process can write in."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {existing}")


def json_object(text: str) -> dict[str, object]:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def rfc3339_time(text: str) -> datetime:
    """A time with its UTC offset, e.g. 2026-12-01T09:00:00Z."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs a UTC offset (e.g. Z or +02:00): {text!r}")
    return value


def settings_with(
    settings: Settings, update: Mapping[str, Any], flags: Mapping[str, str]
) -> Settings:
    """``settings`` with ``update`` applied and validated as the environment's values are
    (``model_copy`` would skip every validator). An invalid value is a UsageError naming its
    flag (``flags`` maps a field to the flag that set it), else a ConfigError naming its
    variable: either way one line and exit 2."""
    try:
        return Settings.model_validate({**settings.model_dump(), **update})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = _flags_for_variables(first["msg"].removeprefix("Value error, "), flags)
        if field in flags:
            raise UsageError(f"{flags[field]}: {message} (got {first.get('input')!r})") from None
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {message}") from None


def _flags_for_variables(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each POPSCORE_* variable a flag gave named by that flag: the user typed
    the flag (``--yield-to X --group X``: "must not be this consumer's own --group")."""
    for field, flag in flags.items():
        message = re.sub(rf"\b{ENV_PREFIX}{field.upper()}\b", flag, message)
    return message


@contextmanager
def flags_named(flags: Mapping[str, str]) -> Iterator[None]:
    """A ConfigError naming the POPSCORE_* variable of a setting a flag gave (``flags`` maps a
    field to its flag) becomes a UsageError naming the flag; others pass unchanged."""
    try:
        yield
    except ConfigError as exc:
        variable, _, detail = str(exc).partition(": ")
        flag = flags.get(variable.removeprefix(ENV_PREFIX).lower())
        if flag is None:
            raise
        raise UsageError(f"{flag}: {detail}") from None
