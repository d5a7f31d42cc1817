"""Dead letters: their forms from fullest to barest, the internal_error detail, and what is the
process's failure rather than a record's."""

import errno

import pytest
from confluent_kafka import Message

from consumer.dead_letters import (
    Rejected,
    barest_dead_letter,
    dead_letter_forms,
    internal_error,
    of_the_process,
)
from consumer.errors import DeadLetter, DeviceFailure
from consumer.redact import redact
from schemas.dead_letter import (
    HEADER_KEY_OMITTED,
    HEADER_REASON,
    HEADER_REPLAYED_FROM,
    HEADER_VALUE_OMITTED,
    DeadLetterReason,
)


def message(key: bytes | None = b"k", value: bytes | None = b"{bad") -> Message:
    headers = [("traceparent", b"00-ab"), ("popscore.error.reason", b"spoof")]
    return Message(topic="releases", partition=2, offset=9, key=key, value=value, headers=headers)


def test_forms_go_from_the_whole_record_to_popscores_headers_alone() -> None:
    item = Rejected(message(), DeadLetter(DeadLetterReason.INVALID_JSON, "bad"))
    full, no_value, barest = dead_letter_forms(item)
    assert full[:2] == (b"k", b"{bad") and ("traceparent", b"00-ab") in full[2]
    assert [v for k, v in full[2] if k == HEADER_REASON] == [b"invalid_json"], "no spoofing"
    assert no_value[:2] == (b"k", None) and (HEADER_VALUE_OMITTED, b"4") in no_value[2]
    assert barest[:2] == (None, None) and (HEADER_KEY_OMITTED, b"1") in barest[2]
    assert all(not k.startswith("traceparent") for k, _ in barest[2])


def test_a_replayed_record_that_fails_again_names_the_dead_letter_it_came_from() -> None:
    """replay-dlq then replays this dead letter, not the earlier one again; every form keeps
    it (one popscore.replay.from, never a copy of a spoofed second)."""
    replayed = Message(topic="releases", partition=0, offset=3, key=b"k", value=b"{bad",
                       headers=[(HEADER_REPLAYED_FROM, b"releases-dlq/1/7"),
                                (HEADER_REPLAYED_FROM, b"spoof")])  # fmt: skip
    item = Rejected(replayed, DeadLetter(DeadLetterReason.INVALID_JSON, "bad"))
    for _key, _value, headers in dead_letter_forms(item):
        assert [v for k, v in headers if k == HEADER_REPLAYED_FROM] == [b"releases-dlq/1/7"]
    fresh = dead_letter_forms(Rejected(message(), DeadLetter(DeadLetterReason.INVALID_JSON, "x")))
    assert all(k != HEADER_REPLAYED_FROM for k, _ in fresh[0][2])


def test_the_fallback_dead_letter_is_skipped_by_replay() -> None:
    """replay-dlq skips a dead letter marked value_omitted: re-publishing an empty record would
    turn the event into invalid_json and lose it."""
    _, value, headers = barest_dead_letter(
        message(), DeadLetter(DeadLetterReason.INTERNAL_ERROR, "x")
    )
    assert value is None and (HEADER_VALUE_OMITTED, b"4") in headers


def test_internal_error_names_the_exception_without_secrets_or_traceback() -> None:
    letter = internal_error(ValueError("at https://u:pw@h/x?X-Amz-Signature=s\nsecond line"))
    assert letter.reason is DeadLetterReason.INTERNAL_ERROR
    assert letter.detail == "ValueError: at https://***@h/x?***"
    assert internal_error(KeyError()).detail == "KeyError"


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        OSError(errno.EMFILE, "too many"),
        OSError(errno.ENFILE, "x"),
        DeviceFailure("device: CUDA error"),
    ],
)
def test_the_process_failures_are_raised_not_dead_lettered(exc: BaseException) -> None:
    assert of_the_process(exc)
    with pytest.raises(type(exc)):
        internal_error(exc)


def test_redact_keeps_a_password_with_an_at_sign_out() -> None:
    assert (
        redact("GET http://user:p@ss@host/a.wav?sig=1 200") == "GET http://***@host/a.wav?*** 200"
    )
    assert not of_the_process(OSError(errno.ENOENT, "missing"))
