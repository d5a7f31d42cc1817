"""Why a record went to the dead-letter topic: the ``popscore.error.reason`` header."""

from enum import StrEnum


class DeadLetterReason(StrEnum):
    """A fixed set, so alerts and ``replay-dlq`` can select by reason."""

    INVALID_JSON = "invalid_json"
    """The value is not UTF-8 JSON."""
    MESSAGE_TOO_LARGE = "message_too_large"
    """The Kafka value is over ``POPSCORE_MAX_EVENT_BYTES``; it is not parsed."""
    INVALID_EVENT = "invalid_event"
    """JSON, but not a valid ReleaseEvent v1 (missing field, wrong type, out of range)."""
    URI_UNSUPPORTED = "uri_unsupported"
    """The audio URI has a scheme popscore cannot fetch."""
    URI_FORBIDDEN = "uri_forbidden"
    """The audio policy refuses the URI: outside the file roots, a private host, or an S3 bucket
    not on the list."""
    AUDIO_FETCH_FAILED = "audio_fetch_failed"
    """The audio could not be read: missing file or object, HTTP or S3 error, timeout."""
    AUDIO_DECODE_FAILED = "audio_decode_failed"
    """The bytes are not audio libsndfile can decode, or are empty or corrupt."""
    AUDIO_TOO_LARGE = "audio_too_large"
    """The audio is over ``POPSCORE_AUDIO_MAX_BYTES``."""
    AUDIO_TOO_LONG = "audio_too_long"
    """The audio is over ``POPSCORE_AUDIO_MAX_SECONDS``."""
    INFERENCE_FAILED = "inference_failed"
    """The model raised or returned a non-finite score for this event."""
    PROCESS_CRASHED = "process_crashed"
    """The consumer process died (a native crash, the OOM killer: nothing it could catch) or
    failed its device ``POPSCORE_CRASH_LIMIT`` times while processing this record alone; it is
    not tried again."""
    INTERNAL_ERROR = "internal_error"
    """Processing this record raised an error nobody anticipated (a bug, or input no check
    foresaw); the detail names the exception. Only this record is affected."""


# Header names. Every header popscore adds starts with OWN_HEADER_PREFIX; the others on a dead
# letter are the original record's own.
OWN_HEADER_PREFIX = "popscore."
HEADER_REASON = "popscore.error.reason"
HEADER_DETAIL = "popscore.error.detail"
HEADER_TOPIC = "popscore.source.topic"
HEADER_PARTITION = "popscore.source.partition"
HEADER_OFFSET = "popscore.source.offset"
HEADER_VALUE_OMITTED = "popscore.error.value_omitted"
"""Set (to the original value's size in bytes) on a dead letter whose value is left out: it was
over the producer's ``message.max.bytes``. The source headers still point at the original."""
HEADER_KEY_OMITTED = "popscore.error.key_omitted"
"""Set (to the original key's size in bytes) on a dead letter that is still too large without
its value: its key and the original's own headers are left out too."""
HEADER_REPLAYED_FROM = "popscore.replay.from"
"""On a record ``replay-dlq`` re-published: the dead letter it came from, as
``topic/partition/offset``."""
