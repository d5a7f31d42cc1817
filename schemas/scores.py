"""ScoreRecord v1: the ``release-scores`` value and the Redis hash fields (docs/INTERFACE.md)."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field

from schemas.events import WIRE_CONFIG, UtcDatetime


class ScoreRecord(BaseModel):
    """One scored release. ``latency_ms`` is measured from ``emitted_at`` to ``scored_at``."""

    model_config = WIRE_CONFIG

    schema_version: Literal[1] = 1
    event_id: Annotated[str, Field(min_length=1, max_length=256)]
    track_id: Annotated[str, Field(min_length=1, max_length=128)]
    model_version: Annotated[str, Field(min_length=1, max_length=256)]
    popularity: Annotated[float, Field(ge=0.0, le=100.0)]
    hit_probability: Annotated[float, Field(ge=0.0, le=1.0)]
    is_hit: bool
    audio_used: bool
    emitted_at: UtcDatetime
    scored_at: UtcDatetime
    latency_ms: float

    @classmethod
    def from_json(cls, value: bytes | str) -> Self:
        """Parse a results-topic value."""
        return cls.model_validate_json(value)

    def encode(self) -> bytes:
        """The results-topic value."""
        return self.model_dump_json().encode()

    def redis_fields(self) -> dict[str, str]:
        """The hash fields as text: strings and times as they are, numbers as decimal text,
        booleans ``true``/``false`` (not JSON: a string has no quotes); ``from_redis`` reads
        them back."""
        dumped = self.model_dump(mode="json")
        return {name: _text(value) for name, value in dumped.items()}

    @classmethod
    def from_redis(cls, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Self:
        """Read a ``popscore:score:{track_id}`` hash (as returned by redis-py ``hgetall``)."""
        decoded = {_str(k): _str(v) for k, v in fields.items()}
        known: dict[str, object] = {k: v for k, v in decoded.items() if k in cls.model_fields}
        # Hash values are text: lax mode parses "71.2", "true" and ISO times; a Literal
        # does not coerce, so the version is converted here.
        known["schema_version"] = int(str(known.get("schema_version", "1")))
        return cls.model_validate(known, strict=False)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def utc_now() -> datetime:
    """The scoring clock, timezone-aware so records compare with ``emitted_at``."""
    return datetime.now(UTC)
