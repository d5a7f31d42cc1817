"""Dead letters: a consumed record that cannot be scored, why, and the headers of its copy in
the dead-letter topic (docs/INTERFACE.md, "Dead letters").

The copy keeps the original key, value and headers, then adds popscore's own: the reason, a
detail, and where the original came from. ``replay-dlq`` strips popscore's headers again.
"""

from dataclasses import dataclass

from confluent_kafka import Message

from consumer.errors import DeadLetter
from consumer.kafka import Header
from schemas.dead_letter import (
    HEADER_DETAIL,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    OWN_HEADER_PREFIX,
)

MAX_DETAIL = 1000


@dataclass(frozen=True)
class Rejected:
    """A consumed message that goes to the DLQ, and why."""

    message: Message
    error: DeadLetter


def headers_of(msg: Message) -> list[Header]:
    """A record's headers as (key, value) pairs, in order."""
    headers = msg.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def foreign_headers(msg: Message) -> list[Header]:
    """The headers of a record that are not popscore's own (popscore.error.*, .source.*,
    .replay.* describe one failure or replay; the rest belong to whoever produced it)."""
    return [(k, v) for k, v in headers_of(msg) if not k.startswith(OWN_HEADER_PREFIX)]


def dead_letter_headers(item: Rejected) -> list[Header]:
    """The original's own headers (tracing, provenance: replay-dlq carries them back), then
    why it failed and where it came from."""
    msg = item.message
    why: list[Header] = [
        (HEADER_REASON, item.error.reason.value.encode()),
        (HEADER_DETAIL, item.error.detail[:MAX_DETAIL].encode()),
        (HEADER_TOPIC, (msg.topic() or "").encode()),
        (HEADER_PARTITION, str(msg.partition()).encode()),
        (HEADER_OFFSET, str(msg.offset()).encode()),
    ]
    return [*foreign_headers(msg), *why]
