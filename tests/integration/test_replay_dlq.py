"""``popscore replay-dlq`` against the real broker: select by reason and time, keep keys,
dry-run moves nothing, the DLQ itself and any consumer group are left untouched."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from popscore.cli.main import main
from schemas.dead_letter import HEADER_DETAIL, HEADER_REASON, HEADER_REPLAYED_FROM, HEADER_TOPIC
from tests.integration.conftest import read_all

pytestmark = pytest.mark.integration


def end_offsets(bootstrap: str, topic: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex}"})
    n = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = [
        consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(n)
    ]
    consumer.close()
    return ends


@pytest.fixture
def dead_letters(consumer_env: dict[str, str]) -> dict[bytes, tuple[str, bytes]]:
    """Five dead letters of two reasons in the test's DLQ topic: key → (reason, value).
    Written in a transaction, as the service does: the partitions end in commit markers."""
    tag = uuid.uuid4().hex[:8]
    letters = {
        f"json-{tag}-{i}".encode(): ("invalid_json", f"{{broken {i}".encode()) for i in range(3)
    } | {
        f"fetch-{tag}-{i}".encode(): ("audio_fetch_failed", f'{{"track_id": "{i}"}}'.encode())
        for i in range(2)
    }
    producer = Producer(
        {
            "bootstrap.servers": consumer_env["POPSCORE_KAFKA_BOOTSTRAP"],
            "transactional.id": f"dlq-writer-{tag}",
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for key, (reason, value) in letters.items():
        headers = [
            (HEADER_REASON, reason.encode()),
            (HEADER_DETAIL, b"test"),
            (HEADER_TOPIC, consumer_env["POPSCORE_INPUT_TOPIC"].encode()),
        ]
        producer.produce(consumer_env["POPSCORE_DLQ_TOPIC"], value, key, headers=headers)
    producer.commit_transaction(30)
    # An aborted dead letter is invisible to read_committed readers and is never replayed.
    producer.begin_transaction()
    producer.produce(consumer_env["POPSCORE_DLQ_TOPIC"], b"{aborted", b"aborted", headers=[])
    producer.abort_transaction(30)
    return letters


@pytest.fixture
def env(consumer_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in consumer_env.items():
        monkeypatch.setenv(key, value)
    return consumer_env


def test_dry_run_counts_and_moves_nothing(
    env: dict[str, str],
    dead_letters: dict[bytes, tuple[str, bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = env["POPSCORE_KAFKA_BOOTSTRAP"]
    dlq_before = end_offsets(bootstrap, env["POPSCORE_DLQ_TOPIC"])

    assert main(["replay-dlq", "--dry-run"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"would replay 5 of 5 dead letters read from {env['POPSCORE_DLQ_TOPIC']}"
        f" to {env['POPSCORE_INPUT_TOPIC']}"
    )
    assert "audio_fetch_failed     2" in out and "invalid_json           3" in out
    assert sum(end_offsets(bootstrap, env["POPSCORE_INPUT_TOPIC"])) == 0
    assert end_offsets(bootstrap, env["POPSCORE_DLQ_TOPIC"]) == dlq_before


def test_replay_one_reason_keeps_keys_and_values(
    env: dict[str, str],
    dead_letters: dict[bytes, tuple[str, bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bootstrap = env["POPSCORE_KAFKA_BOOTSTRAP"]
    dlq_before = end_offsets(bootstrap, env["POPSCORE_DLQ_TOPIC"])

    assert main(["replay-dlq", "--reason", "audio_fetch_failed"]) == 0

    assert capsys.readouterr().out.startswith("replayed 2 of 5 dead letters")
    replayed = read_all(bootstrap, env["POPSCORE_INPUT_TOPIC"], 2, timeout_s=30)
    expected = {k: v for k, (reason, v) in dead_letters.items() if reason == "audio_fetch_failed"}
    assert {m.key(): m.value() for m in replayed} == expected
    assert len(replayed) == 2
    for message in replayed:
        headers = dict(message.headers())
        assert set(headers) == {HEADER_REPLAYED_FROM}, "the dead letter's headers are dropped"
        assert headers[HEADER_REPLAYED_FROM].decode().startswith(env["POPSCORE_DLQ_TOPIC"] + "/")
    assert end_offsets(bootstrap, env["POPSCORE_DLQ_TOPIC"]) == dlq_before, "the DLQ is kept"


def test_time_window_and_explicit_topics(
    env: dict[str, str],
    dead_letters: dict[bytes, tuple[str, bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    earlier = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    source = ["--from-topic", env["POPSCORE_DLQ_TOPIC"]]
    target = ["--to-topic", env["POPSCORE_OUTPUT_TOPIC"]]

    assert main(["replay-dlq", *source, *target, "--since", later]) == 0
    assert capsys.readouterr().out.startswith("replayed 0 of 0 dead letters")
    assert main(["replay-dlq", *source, *target, "--until", earlier, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would replay 0 of 5")
    assert main(["replay-dlq", *source, *target, "--since", earlier, "--until", later]) == 0
    assert capsys.readouterr().out.startswith("replayed 5 of 5")
    replayed = read_all(env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_OUTPUT_TOPIC"], 5, 30)
    assert {m.key() for m in replayed} == set(dead_letters)
    assert sum(end_offsets(env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_INPUT_TOPIC"])) == 0


def test_same_topic_or_missing_topic_is_refused(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay-dlq", "--to-topic", env["POPSCORE_DLQ_TOPIC"]]) == 2
    assert "--to-topic must differ" in capsys.readouterr().err
    absent = ["--from-topic", f"no-such-{uuid.uuid4().hex}", "--to-topic", "somewhere"]
    assert main(["replay-dlq", *absent]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a target that does not exist is a typo, not a topic to create
    assert main(["replay-dlq", "--to-topic", f"relases-typo-{uuid.uuid4().hex}"]) == 2
    assert "--to-topic: topic 'relases-typo-" in capsys.readouterr().err
    # another DLQ (a backfill's) without --to-topic: its default is the live input
    with pytest.raises(SystemExit) as exited:
        main(["replay-dlq", "--from-topic", "releases-dlq-backfill"])
    assert exited.value.code == 2
    assert "--to-topic: say where the dead letters of releases-dlq-backfill go" in (
        capsys.readouterr().err
    )


def test_a_dead_letter_whose_replay_failed_again_is_not_replayed_again(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An event whose audio is still missing: replayed, dead-lettered again (the new dead
    letter names the first in popscore.replay.from), and so on. Replaying the whole DLQ each
    time replayed every earlier copy too: 1, 2, 4, 8 dead letters after three runs."""
    bootstrap, dlq = env["POPSCORE_KAFKA_BOOTSTRAP"], env["POPSCORE_DLQ_TOPIC"]
    producer = Producer({"bootstrap.servers": bootstrap})
    why = [(HEADER_REASON, b"audio_fetch_failed"), (HEADER_DETAIL, b"HTTP 404")]
    producer.produce(dlq, b'{"first": 1}', b"k", headers=why, partition=0)
    producer.flush(10)
    first = f"{dlq}/0/0"
    # its replay failed again, for another reason this time
    again = [(HEADER_REASON, b"audio_decode_failed"), (HEADER_DETAIL, b"truncated"),
             (HEADER_REPLAYED_FROM, first.encode())]  # fmt: skip
    producer.produce(dlq, b'{"first": 1}', b"k", headers=again, partition=0)
    producer.flush(10)

    assert main(["replay-dlq"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("replayed 1 of 2 dead letters")
    assert "skipped 1 replayed before whose replay failed again" in out
    [replayed] = read_all(bootstrap, env["POPSCORE_INPUT_TOPIC"], 1, timeout_s=30)
    assert dict(replayed.headers())[HEADER_REPLAYED_FROM] == f"{dlq}/0/1".encode()
    # a later dead letter outside the selection stands for nothing: the first is replayed
    assert main(["replay-dlq", "--dry-run", "--reason", "audio_fetch_failed"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would replay 1 of 2") and "skipped" not in out
