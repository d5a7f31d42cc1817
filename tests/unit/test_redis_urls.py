"""with_database: a Redis URL naming another database (redis-py takes the URL's over db=)."""

import pytest
from redis.connection import parse_url

from consumer.redis_client import with_database


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",  # no database: rsplit("/") made the host "15"
        "redis://127.0.0.1:6379/0",
        "rediss://:p%2Fw@h:6380/3?ssl_ca_certs=/a/b.pem",  # a "/" in the query
        "unix:///tmp/redis.sock?db=2",
    ],
)
def test_the_url_names_the_database_and_keeps_the_rest(url: str) -> None:
    changed = parse_url(with_database(url, 15))
    before = parse_url(url)
    assert changed["db"] == 15
    assert {k: v for k, v in changed.items() if k != "db"} == {
        k: v for k, v in before.items() if k != "db"
    }
