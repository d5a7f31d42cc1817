"""What every subcommand's arguments share: the parser class, the handler type, and the
``type=`` validators. A validator raises ``argparse.ArgumentTypeError`` (or ``ValueError``),
which the parser turns into one line on stderr and exit status 2.
"""

import argparse
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NoReturn, TypeAlias

from consumer.settings import Settings

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


def positive_float(text: str) -> float:
    """A number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


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
