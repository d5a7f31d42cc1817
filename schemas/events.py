"""ReleaseEvent v1: what streaming platforms publish to the ``releases`` topic (docs/INTERFACE.md).

Strict types (``"12"`` is not a number, ``1.5`` is not an int), finite numbers, documented
ranges. Unknown fields are ignored so producers can add fields before popscore knows them.
"""

import datetime as dt
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

WIRE_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=0)]
ShortText = Annotated[str, Field(max_length=512)]


def _calendar_date(value: str) -> str:
    """The pattern admits 2024-13 and 2024-02-30; the calendar does not."""
    year, month, day = [*value.split("-"), "01", "01"][:3]
    dt.date(int(year), int(month), int(day))  # ValueError: pydantic reports it on the field
    return value


def _in_utc_range(value: dt.datetime) -> dt.datetime:
    """RFC 3339 admits 9999-12-31T23:59:59-01:00, whose UTC time is in the year 10000: scores,
    leaderboard days and ordering are kept in UTC, so such a time is not a usable one."""
    try:
        value.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("not representable in UTC (years 1 to 9999)") from None
    return value


# An RFC 3339 time with an offset that UTC can represent.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc_range)]

# Catalogues know some releases only to the month or the year (Spotify's
# release_date_precision): "1981" and "1981-06" are dates too, not bad events.
ReleaseDate = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{4}(-[0-9]{2}(-[0-9]{2})?)?$",
        description="YYYY-MM-DD, or YYYY-MM / YYYY when only the month or the year is known",
    ),
    AfterValidator(_calendar_date),
]


class Artist(BaseModel):
    """The release's main artist as the platform knows it today."""

    model_config = WIRE_CONFIG

    id: ShortText | None = None
    name: ShortText | None = None
    popularity: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    followers: Count | None = None
    genres: Annotated[list[ShortText], Field(max_length=64)] | None = None


class Release(BaseModel):
    """Facts about the release itself."""

    model_config = WIRE_CONFIG

    # The track title as released, version suffix included ("Song - Live at Wembley",
    # "Song (Remix)"): the model reads version flags from it (popscore.artifact.features).
    title: ShortText | None = None
    date: ReleaseDate | None = None
    market: ShortText | None = None
    explicit: bool | None = None
    duration_ms: Count | None = None


class AudioFeatures(BaseModel):
    """Spotify-style audio features, as the platform computed them."""

    model_config = WIRE_CONFIG

    acousticness: Unit | None = None
    danceability: Unit | None = None
    energy: Unit | None = None
    instrumentalness: Unit | None = None
    liveness: Unit | None = None
    speechiness: Unit | None = None
    valence: Unit | None = None
    loudness: Annotated[float, Field(ge=-100.0, le=20.0)] | None = None
    tempo: Annotated[float, Field(ge=0.0, le=400.0)] | None = None
    time_signature: Annotated[int, Field(ge=0, le=16)] | None = None
    key: Annotated[int, Field(ge=-1, le=11)] | None = None
    mode: Annotated[int, Field(ge=0, le=1)] | None = None


class Engagement(BaseModel):
    """Early engagement counts over the first ``window_hours`` after release."""

    model_config = WIRE_CONFIG

    window_hours: Annotated[float, Field(gt=0.0, le=24.0 * 366)] | None = None
    streams: Count | None = None
    saves: Count | None = None
    playlist_adds: Count | None = None
    skips: Count | None = None
    shares: Count | None = None


class ReleaseEvent(BaseModel):
    """One new release to score. ``event_id`` is unique per event, ``track_id`` per track."""

    model_config = WIRE_CONFIG

    schema_version: Literal[1] = 1
    event_id: Annotated[str, Field(min_length=1, max_length=256)]
    track_id: Annotated[str, Field(min_length=1, max_length=128)]
    emitted_at: UtcDatetime
    audio_uri: Annotated[str, Field(min_length=1, max_length=4096)]
    artist: Artist | None = None
    release: Release | None = None
    audio_features: AudioFeatures | None = None
    engagement: Engagement | None = None

    @classmethod
    def from_json(cls, value: bytes | str) -> Self:
        """Parse a Kafka value; raises ``pydantic.ValidationError`` (invalid JSON included)."""
        return cls.model_validate_json(value)

    def encode(self) -> bytes:
        """The wire form: compact JSON without the unset optional groups."""
        return self.model_dump_json(exclude_none=True).encode()
