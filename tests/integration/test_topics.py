"""Topic creation and clean-up against a real broker: ``delete_topics`` takes exactly the topics
whose names carry the tag, and leaves the rest, a near miss included."""

import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from consumer.kafka import delete_topics, ensure_topics
from popscore.cli.main import main

pytestmark = pytest.mark.integration


def listed(admin: AdminClient, names: set[str], present: bool) -> set[str]:
    """The topic names once ``names`` are all listed (or all gone), or at 30 s: creation and
    deletion reach the broker's metadata asynchronously."""
    deadline = time.monotonic() + 30
    while True:
        now = set(admin.list_topics(timeout=10).topics)
        if (names <= now if present else not names & now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_delete_topics_takes_the_tagged_ones_only(stack: dict[str, str]) -> None:
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    admin = AdminClient(kafka)
    tag = f"cleanup-{uuid.uuid4().hex[:8]}"
    tagged = {f"{tag}-in", f"{tag}-out"}
    kept = {f"keep-{uuid.uuid4().hex[:8]}", tag[:-1] + ("0" if tag[-1] != "0" else "1")}
    ensure_topics(kafka, sorted(tagged | kept), partitions=1)
    try:
        assert tagged | kept <= listed(admin, tagged | kept, present=True)
        assert delete_topics(kafka, tag) == 2
        names = listed(admin, tagged, present=False)
        assert not tagged & names
        assert kept <= names
        assert delete_topics(kafka, tag) == 0
    finally:
        for name in kept:
            delete_topics(kafka, name)


def test_popscore_topics_creates_the_missing_ones_and_says_which_are_there(
    stack: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = f"topicscmd-{uuid.uuid4().hex[:8]}"
    for var in ("INPUT", "OUTPUT", "DLQ"):
        monkeypatch.setenv(f"POPSCORE_{var}_TOPIC", f"{tag}-{var.lower()}")
    monkeypatch.setenv("POPSCORE_KAFKA_BOOTSTRAP", stack["bootstrap"])
    monkeypatch.delenv("POPSCORE_SHADOW_MODEL", raising=False)  # it would name a fourth
    try:
        assert main(["topics"]) == 1, "missing ones: exit 1"
        assert capsys.readouterr().out.count("missing") == 3
        assert main(["topics", "--create", "--partitions", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == [
            "POPSCORE_INPUT_TOPIC", "POPSCORE_OUTPUT_TOPIC", "POPSCORE_DLQ_TOPIC"
        ]  # fmt: skip
        assert all(line.endswith("2 partitions") for line in lines)
    finally:
        delete_topics({"bootstrap.servers": stack["bootstrap"]}, tag)
