"""Topic administration for ``produce``, the tests and the demo; the service creates none."""

from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.errors import PopscoreError
from consumer.kafkalog import librdkafka_logger


def ensure_topics(config: dict[str, Any], topics: list[str], partitions: int = 3) -> None:
    """Create the topics that do not exist yet (replication 1: the local stack has one broker)."""
    conf: dict[str, Any] = {**config, "logger": librdkafka_logger("admin")}
    admin = AdminClient(conf)
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [
        NewTopic(t, num_partitions=partitions, replication_factor=1)
        for t in topics
        if t not in existing
    ]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=15).items():
        try:
            future.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise PopscoreError(f"cannot create topic {topic}: {exc}") from exc
