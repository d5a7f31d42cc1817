"""Topic creation and clean-up against a real broker: ``delete_topics`` takes exactly the topics
whose names carry the tag, and leaves the rest."""

import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from consumer.kafka import delete_topics, ensure_topics

pytestmark = pytest.mark.integration


def test_delete_topics_takes_the_tagged_ones_only(stack: dict[str, str]) -> None:
    kafka = {"bootstrap.servers": stack["bootstrap"]}
    tag = f"cleanup-{uuid.uuid4().hex[:8]}"
    other = f"keep-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, [f"{tag}-in", f"{tag}-out", other], partitions=1)
    try:
        assert delete_topics(kafka, tag) == 2
        admin = AdminClient(kafka)
        deadline = time.monotonic() + 30  # deletion reaches the metadata asynchronously
        while True:
            names = set(admin.list_topics(timeout=10).topics)
            if not {f"{tag}-in", f"{tag}-out"} & names or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert not {f"{tag}-in", f"{tag}-out"} & names
        assert other in names
        assert delete_topics(kafka, tag) == 0
    finally:
        delete_topics(kafka, other)
