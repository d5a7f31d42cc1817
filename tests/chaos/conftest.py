"""Chaos tests share the integration fixtures: real Kafka, real Redis, unique topics."""

from tests.integration.conftest import (  # noqa: F401 - fixtures
    consumer_env,
    model_path,
    redis_client,
    redis_cluster_url,
    stack,
    topics,
)
