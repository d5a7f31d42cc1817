"""Which ReleaseEvent fields the model reads, and how one event becomes a feature row.

The order of `DEFAULT_FEATURES` is part of the artifact: it is written into the artifact's
metadata (`features`), and serving builds its feature matrix in exactly that order.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

AUDIO_FEATURE_NAMES = (
    "acousticness",
    "danceability",
    "energy",
    "instrumentalness",
    "liveness",
    "loudness",
    "speechiness",
    "valence",
    "tempo",
    "time_signature",
    "key",
    "mode",
)
_ENGAGEMENT = ("streams", "saves", "playlist_adds", "skips", "shares")

DEFAULT_FEATURES: tuple[str, ...] = (
    "artist.popularity",
    "artist.followers",
    *(f"audio_features.{name}" for name in AUDIO_FEATURE_NAMES),
    "release.duration_ms",
    "release.explicit",
    *(f"engagement.{name}" for name in _ENGAGEMENT),
)

# Heavy-tailed counts: the model log1p's these before standardising, otherwise one
# viral release would dominate the fitted mean and std.
COUNT_FEATURES: frozenset[str] = frozenset(
    {"artist.followers", "release.duration_ms", *(f"engagement.{name}" for name in _ENGAGEMENT)}
)


def lookup(event: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path, or None where any step is absent."""
    node: Any = event
    for key in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def release_year(event: Mapping[str, Any]) -> Any:
    """`release.year`, derived from `release.date`: "YYYY-MM-DD", "YYYY-MM" or "YYYY" (what
    ReleaseEvent holds; catalogues often know only the year), or a date object."""
    value = lookup(event, "release.date")
    if isinstance(value, dt.date):
        return value.year
    if isinstance(value, str) and len(value) >= 4 and value[:4].isdigit():
        return int(value[:4])
    return None


# Version flags read from `release.title`. Only the version part counts: what sits in
# brackets or follows " - " ("Song (Radio Edit)", "Song - Live at Wembley"), so a song
# *called* "Live Forever" is no live version. Remixes and live versions are 5-10 points less
# popular than the rest of the paper's tracks (docs/MODEL.md).
TITLE_FLAGS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        "remix": r"\b(re)?mix(es|ed)?\b|\bdub\b",
        "live": r"\blive\b|\bunplugged\b",
        "acoustic": r"\bacoustic\b|\bstripped\b|\bpiano version\b",
        "edit": r"\bedit\b|\bsingle version\b|\bradio version\b",
        "remaster": r"\bremaster(ed)?\b",
        "sped_up": r"\bsped up\b|\bslowed\b",
    }.items()
}
TITLE_FEATURES: tuple[str, ...] = tuple(f"release.title.{name}" for name in TITLE_FLAGS)
_VERSION_PART = re.compile(r"[(\[]([^)\]]*)[)\]]|\s-\s(.*)$")


def version_text(title: Any) -> str | None:
    """The version part of a title ("" when it has none); None when there is no title."""
    # An empty title is no title, as a catalog's empty cell is: serving and training agree.
    if not isinstance(title, str) or not title.strip():
        return None
    return " ".join(a or b for a, b in _VERSION_PART.findall(title))


def _title_flag(flag: re.Pattern[str]) -> Callable[[Mapping[str, Any]], Any]:
    def derive(event: Mapping[str, Any]) -> bool | None:
        text = version_text(lookup(event, "release.title"))
        return None if text is None else flag.search(text) is not None

    return derive


# Paths that are not fields of ReleaseEvent but computed from one; serving gets them through
# `extract` like any other path, so training and the consumer can never compute them apart.
DERIVED: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "release.year": release_year,
    **{
        path: _title_flag(flag)
        for path, flag in zip(TITLE_FEATURES, TITLE_FLAGS.values(), strict=True)
    },
}


# The version of extract's rules together with popscore/training/catalog.py's column mapping:
# bump it when some input gets another feature row, so prepared caches of the old rows are
# refused (popscore.training.cache). 1: the rules when caches began recording it.
FEATURE_RULES = 1

# Rows are float32: a larger value would become inf there, and an inf feature scores (10**39
# followers read as a hit), where a NaN is imputed.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _as_float(value: Any) -> float:
    # bool is checked first because it is an int subclass; anything non-numeric, non-finite or
    # beyond a float32 (a 400-digit count is a valid JSON integer) becomes NaN, which the
    # artifact imputes.
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return math.nan
        return number if abs(number) <= FLOAT32_MAX else math.nan  # NaN fails this too
    return math.nan


def extract(event_dict: Mapping[str, Any], paths: Sequence[str] = DEFAULT_FEATURES) -> np.ndarray:
    """One event (a ReleaseEvent as a dict) -> float32 row in `paths` order, NaN where missing."""
    values = [DERIVED[p](event_dict) if p in DERIVED else lookup(event_dict, p) for p in paths]
    return np.array([_as_float(value) for value in values], dtype=np.float32)


def extract_many(
    events: Iterable[Mapping[str, Any]], paths: Sequence[str] = DEFAULT_FEATURES
) -> np.ndarray:
    """Several events -> float32 matrix [n, len(paths)]."""
    rows = [extract(event, paths) for event in events]
    if not rows:
        return np.zeros((0, len(paths)), dtype=np.float32)
    return np.stack(rows)
