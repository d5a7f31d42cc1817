"""Dead letters: a consumed record that cannot be scored, why, and the headers of its copy in
the dead-letter topic (docs/INTERFACE.md, "Dead letters").

The copy keeps the original key, value and headers, then adds popscore's own: the reason, a
detail, and where the original came from. ``replay-dlq`` strips popscore's headers again. A copy
too large for the producer leaves out the value, then the key and the original's headers.
"""

import errno
from dataclasses import dataclass

from confluent_kafka import Message

from consumer.errors import DeadLetter, DeviceFailure
from consumer.kafka import Header
from consumer.redact import redact
from schemas.dead_letter import (
    HEADER_DETAIL,
    HEADER_KEY_OMITTED,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_REPLAYED_FROM,
    HEADER_TOPIC,
    HEADER_VALUE_OMITTED,
    OWN_HEADER_PREFIX,
)
from schemas.dead_letter import DeadLetterReason as Reason

MAX_DETAIL = 1000
INTERNAL_DETAIL = 300
DeadLetterRecord = tuple[bytes | None, bytes | None, list[Header]]  # key, value, headers


def internal_error(exc: BaseException) -> DeadLetter:
    """The dead letter of a record whose processing raised ``exc`` unexpectedly: the exception's
    type and first line, URLs redacted; no traceback (it would repeat for every such record).
    A failure of the process itself (out of memory or descriptors, a failed device) is raised
    again instead: it would meet every record, and is the process's to stop on."""
    if of_the_process(exc):
        raise exc
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    detail = redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)
    return DeadLetter(Reason.INTERNAL_ERROR, detail[:INTERNAL_DETAIL])


@dataclass(frozen=True)
class Rejected:
    """A consumed message that goes to the DLQ, and why."""

    message: Message
    error: DeadLetter
    event_id: str | None = None
    """The event's id, when the message parsed: a claim its record holds on it is released."""


def headers_of(msg: Message) -> list[Header]:
    """A record's headers as (key, value) pairs, in order."""
    headers = msg.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def foreign_headers(msg: Message) -> list[Header]:
    """The headers of a record that are not popscore's own (popscore.error.*, .source.*,
    .replay.* describe one failure or replay; the rest belong to whoever produced it)."""
    return [(k, v) for k, v in headers_of(msg) if not k.startswith(OWN_HEADER_PREFIX)]


def of_the_process(exc: BaseException) -> bool:
    """Whether ``exc`` is the process's trouble rather than a record's: out of memory or file
    descriptors, or a failed device."""
    if isinstance(exc, MemoryError | DeviceFailure):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def barest_dead_letter(msg: Message, error: DeadLetter) -> DeadLetterRecord:
    """popscore's headers alone, no key or value: a dead letter that always fits and that
    ``replay-dlq`` skips (there is nothing to replay; the source headers say where it lies)."""
    value_omitted: Header = (HEADER_VALUE_OMITTED, str(len(msg.value() or b"")).encode())
    key_omitted: Header = (HEADER_KEY_OMITTED, str(len(msg.key() or b"")).encode())
    return None, None, [*why_headers(msg, error), value_omitted, key_omitted]


def dead_letter_forms(item: Rejected) -> list[DeadLetterRecord]:
    """The dead letter of ``item`` as (key, value, headers), fullest first: the original key,
    value and headers, then popscore's; without the value (over the producer's
    ``message.max.bytes``); without the key and the original's headers too (a huge key or
    header). The last is popscore's headers alone, at most a few kB: one form always fits."""
    msg = item.message
    why = why_headers(msg, item.error)
    key, value = msg.key(), msg.value()
    value_omitted: Header = (HEADER_VALUE_OMITTED, str(len(value or b"")).encode())
    return [
        (key, value, [*foreign_headers(msg), *why]),
        (key, None, [*foreign_headers(msg), *why, value_omitted]),
        barest_dead_letter(msg, item.error),
    ]


def why_headers(msg: Message, error: DeadLetter) -> list[Header]:
    """popscore's own headers of a dead letter: why it failed, where the original lies, and,
    when the original was itself a replay, the dead letter it was replayed from (so
    ``replay-dlq`` replays the latest dead letter of an event, not every earlier one again)."""
    replayed = [(k, v) for k, v in headers_of(msg) if k == HEADER_REPLAYED_FROM][:1]
    return [
        (HEADER_REASON, error.reason.value.encode()),
        (HEADER_DETAIL, error.detail[:MAX_DETAIL].encode()),
        (HEADER_TOPIC, (msg.topic() or "").encode()),
        (HEADER_PARTITION, str(msg.partition()).encode()),
        (HEADER_OFFSET, str(msg.offset()).encode()),
        *replayed,
    ]
