"""One way to open Redis for every command: a single node (``redis://``, ``rediss://``,
``unix://``) or, with ``POPSCORE_REDIS_CLUSTER=true``, Redis Cluster through redis-py's cluster
client seeded by the same URL. ``NodePipelines`` sends many single-slot commands in one round
trip per cluster node, which redis-py's own cluster pipeline refuses for scripts."""

import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.exceptions import RedisClusterException

from consumer.errors import ConfigError
from schemas.redis_keys import RedisKeys

AnyRedis = redis.Redis | RedisCluster


def connect(url: str, cluster: bool, socket_timeout: float = 10.0) -> AnyRedis:
    """The client for ``url``: a cluster client (which discovers every node from this one)
    when ``cluster``, else a single-node client."""
    if cluster:
        try:
            return RedisCluster.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=5
            )
        except RedisClusterException as exc:  # a plain Redis answers: the setting is wrong
            if "cluster mode is not enabled" not in str(exc).lower():
                raise
            raise ConfigError(
                "POPSCORE_REDIS_CLUSTER: the Redis at POPSCORE_REDIS_URL is not in cluster mode"
            ) from None
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5)


def with_database(url: str, db: int) -> str:
    """``url`` naming database ``db``: the path of a redis:// or rediss:// URL, the ``db``
    query parameter of a unix:// one (a URL's database wins over a ``db=`` argument)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return f"unix://{parts.netloc}{parts.path}?{urlencode(query)}"
    return urlunsplit(parts._replace(path=f"/{db}"))


def close(client: AnyRedis) -> None:
    """Close a client and every socket it opened: RedisCluster.close leaves the node pools'
    connections open (redis-py 8.1)."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():  # type: ignore[no-untyped-call]
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
    client.close()


def node_clients(client: AnyRedis) -> list[redis.Redis]:
    """One client per primary of a cluster; the client itself on one node."""
    if isinstance(client, RedisCluster):
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [client.get_redis_connection(node) for node in primaries]
    return [client]


def scan_prefix(client: AnyRedis, prefix: str, count: int = 1000) -> Iterator[str]:
    """Every key starting with ``prefix`` (glob characters in it taken literally), on every
    primary of a cluster (node by node through each node's own client: the cluster client's
    scan_iter leaves a connection unclosed in redis-py 8.1)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    for node in node_clients(client):
        for key in node.scan_iter(match=pattern, count=count):
            yield key.decode() if isinstance(key, bytes) else str(key)


def keys_for(client: AnyRedis) -> RedisKeys:
    """The key layout a client's deployment uses."""
    return RedisKeys.for_cluster(isinstance(client, RedisCluster))


class Script:
    """A Lua script run by EVALSHA through ``NodePipelines``, loaded on a node when it answers
    NOSCRIPT (a replica promoted by a failover has an empty script cache)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def command(self, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


# Replies that mean the topology moved under us (failover, resharding): refresh the slot map
# and try again; the caller's writes are idempotent.
TOPOLOGY_ERRORS = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
)


MAX_REDIRECTS = 5  # a slot moved on while its command was redirected: re-read, try again


class NotReplicated(redis.exceptions.TryAgainError):
    """A node's writes did not reach enough replicas in time: retried, never acknowledged."""


class NodePipelines:
    """Run commands, each touching one hash slot (routed by its first key), as one
    non-transactional pipeline per primary node, written to every node before any reply is
    read (the nodes work in parallel); replies come back in call order.

    With ``min_replicas`` > 0 each node's pipeline ends with ``WAIT``: a call returns only once
    that many replicas hold its writes, so a failover (which promotes a replica) cannot lose a
    write the caller then reports as done (Redis replicates asynchronously otherwise)."""

    def __init__(
        self,
        client: RedisCluster,
        scripts: Sequence[Script],
        min_replicas: int = 0,
        wait_ms: int = 2000,
    ) -> None:
        self.client = client
        self.scripts = list(scripts)
        self.min_replicas = min_replicas
        self.wait_ms = wait_ms

    def run(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """``calls``: (a key the command touches, the command). Raises the first error reply,
        after a topology refresh when it was one of TOPOLOGY_ERRORS; a node that has lost its
        script cache (NOSCRIPT) gets the scripts and the whole call once more."""
        try:
            return self._run(calls)
        except redis.exceptions.NoScriptError:
            self._load_scripts()
            return self._run(calls)

    def refresh(self) -> None:
        """Re-read the slot map (after a failover, a MOVED or a dead node)."""
        self.client.nodes_manager.initialize()

    def _run(self, calls: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        replies: list[Any] = [None] * len(calls)
        lagging = self._exchange(calls, replies)
        lagging += self._follow_redirects(calls, replies)
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            if any(isinstance(e, TOPOLOGY_ERRORS) for e in errors):
                self.refresh()
            noscript = [e for e in errors if isinstance(e, redis.exceptions.NoScriptError)]
            raise noscript[0] if noscript else errors[0]
        if lagging:
            raise NotReplicated(
                f"writes not on {self.min_replicas} replica(s) within {self.wait_ms} ms: "
                + ", ".join(lagging)
                + " (POPSCORE_REDIS_MIN_REPLICAS: give that primary a replica, or set 0)"
            )
        return replies

    def _follow_redirects(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]], replies: list[Any]
    ) -> list[str]:
        """Redo the commands a slot migration redirected, as a cluster client does: a MOVED
        one after re-reading the slot map, an ASK one on the importing node after ``ASKING``
        (the slot map does not change until the migration ends, so a refresh alone retried a
        new key of a half-moved slot for ever). Returns the nodes whose WAIT came back short."""
        lagging: list[str] = []
        for _ in range(MAX_REDIRECTS):
            moved = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.MovedError)]
            asked = [i for i, r in enumerate(replies) if type(r) is redis.exceptions.AskError]
            if not moved and not asked:
                break
            if moved:
                self.refresh()
                again: list[Any] = [None] * len(moved)
                lagging += self._exchange([calls[i] for i in moved], again)
                for i, reply in zip(moved, again, strict=True):
                    replies[i] = reply
            for i in asked:
                replies[i], short = self._asking(replies[i], calls[i][1])
                lagging += short
        return lagging

    def _asking(self, redirect: Any, command: tuple[Any, ...]) -> tuple[Any, list[str]]:
        """``command`` on the node an ASK names, preceded by ASKING (and followed by WAIT)."""
        node = self.client.get_node(host=redirect.host, port=redirect.port)  # type: ignore[no-untyped-call]
        if node is None:  # a node the slot map does not know yet
            self.refresh()
            node = self.client.get_node(host=redirect.host, port=redirect.port)  # type: ignore[no-untyped-call]
            if node is None:
                return redirect, []
        [(_ok, reply)], lagging = self._send([(node, [("ASKING",), command])])
        return reply, lagging

    def _exchange(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]], replies: list[Any]
    ) -> list[str]:
        """Send each node its commands (and WAIT), then read every reply into ``replies``;
        returns the nodes whose WAIT came back short."""
        groups = self._by_node(calls)
        answers, lagging = self._send([(node, [calls[i][1] for i in indexes])
                                       for node, indexes in groups])  # fmt: skip
        for (_node, indexes), got in zip(groups, answers, strict=True):
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply
        return lagging

    def _send(
        self, groups: Sequence[tuple[ClusterNode, list[tuple[Any, ...]]]]
    ) -> tuple[list[list[Any]], list[str]]:
        """Each node's commands (and WAIT) on one connection of its own, all written before any
        reply is read; returns each group's replies and the nodes whose WAIT came back short."""
        sent: list[tuple[Connection, ConnectionPool, int]] = []
        answers: list[list[Any]] = []
        lagging: list[str] = []
        try:
            for node, commands in groups:
                pool = self.client.get_redis_connection(node).connection_pool
                conn = pool.get_connection()
                sent.append((conn, pool, len(commands)))
                waited = [("WAIT", self.min_replicas, self.wait_ms)] if self.min_replicas else []
                packed = conn.pack_commands([*commands, *waited])  # type: ignore[no-untyped-call]
                conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
            for conn, _, count in sent:
                answers.append([_reply(conn) for _ in range(count)])
                acked = _reply(conn) if self.min_replicas else self.min_replicas
                if not isinstance(acked, int) or acked < self.min_replicas:
                    # An error reply (an ACL without WAIT) is no acknowledgement either.
                    lagging.append(f"{conn.host}:{conn.port} ({acked} replicas)")
        except BaseException:
            for conn, _, _ in sent:
                conn.disconnect()  # type: ignore[no-untyped-call]  # replies may be left unread
            raise
        finally:
            for conn, pool, _ in sent:
                pool.release(conn)
        return answers, lagging

    def _by_node(
        self, calls: Sequence[tuple[str, tuple[Any, ...]]]
    ) -> list[tuple[ClusterNode, list[int]]]:
        """The calls' indexes, grouped by the primary that serves their key's slot."""
        by_node: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, ClusterNode] = {}
        for i, (key, _) in enumerate(calls):
            node = self.client.get_node_from_key(key)  # type: ignore[no-untyped-call]
            nodes[node.name] = node
            by_node[node.name].append(i)
        return [(nodes[name], indexes) for name, indexes in by_node.items()]

    def _load_scripts(self) -> None:
        for node in self.client.get_primaries():  # type: ignore[no-untyped-call]
            conn = self.client.get_redis_connection(node)
            for script in self.scripts:
                conn.script_load(script.text)


def _reply(conn: Connection) -> Any:
    """One reply; an error reply is returned, not raised, so the rest are still read."""
    try:
        return conn.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc
