"""Every knob of the service, read once from ``POPSCORE_*`` environment variables (README,
"Configuration")."""

import difflib
import logging
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from redis.connection import parse_url

from consumer.errors import ConfigError
from consumer.kafka import OWNED_PROPERTIES
from consumer.s3uri import bucket_name_problem

log = logging.getLogger(__name__)
ENV_PREFIX = "POPSCORE_"
# Their raw values may hold passwords: an error names the variable but never echoes it.
_SECRET_FIELDS = frozenset({"redis_url", "kafka_properties"})
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# Kafka's own rule for topic names (kafka.common.internals.Topic), "." and ".." excepted.
_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


def device_problem(value: str) -> str | None:
    """Why ``value`` is not a scoring device (POPSCORE_DEVICE, --device), or None."""
    return None if _DEVICE.match(value) else "expected auto, cpu, cuda or cuda:N"


def topic_problem(value: str) -> str | None:
    """Why ``value`` is not a legal Kafka topic name, or None: the broker would refuse it only
    once a client asks."""
    if _TOPIC.match(value) and value not in (".", ".."):
        return None
    return "not a Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)"


_TOPIC_FIELDS = ("input_topic", "output_topic", "dlq_topic", "shadow_topic")
# One bootstrap.servers entry as librdkafka reads it: [protocol://]host[:port], IPv6 in [].
_BROKER = re.compile(
    r"^(?:(?:plaintext|ssl|sasl_plaintext|sasl_ssl)://)?"
    r"(?:\[[0-9a-f:.]+(?:%[\w.-]+)?\]|[a-z0-9_][a-z0-9._-]*)(?::(?P<port>\d{1,5}))?$",
    re.IGNORECASE,
)
KafkaRole = Literal["consumer", "producer", "admin"]
# Kafka Streams' convention: "consumer.session.timeout.ms" reaches only the consumer. No
# librdkafka property starts with one of these, so a prefixed key is never ambiguous.
KAFKA_ROLES: tuple[KafkaRole, ...] = ("consumer", "producer", "admin")
# Ten years. Redis refuses an EXPIRE its Lua scripts write in exponent form (1e+14 and up),
# so a larger TTL would pass start-up and fail every write.
MAX_TTL_S = 10 * 365 * 86_400
FFMPEG_MIN_MB = 320
"""An FFmpeg worker maps ~245 MB (Python, numpy, FFmpeg) before it reads a file: with 200 MB
ordinary M4As failed to decode, with 256 they decoded (measured)."""


class Settings(BaseSettings):
    """The consumer's configuration. Frozen: read at start-up, never mutated."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka_bootstrap: str = "localhost:9092"
    """Kafka bootstrap servers, comma-separated host:port."""
    kafka_properties: dict[str, SecretStr] = Field(default_factory=dict)
    """Extra librdkafka properties as a JSON object (security.protocol, sasl.*, ssl.*). A key
    prefixed ``consumer.``, ``producer.`` or ``admin.`` goes only to that kind of client (without
    the prefix), so librdkafka does not warn about a property meant for another kind."""
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    """Redis URL; may hold a password, so it is never logged."""
    redis_cluster: bool = False
    """Redis Cluster: ``redis_url`` names any one node (the client discovers the others) and
    keys take the cluster layout (docs/INTERFACE.md, "Redis Cluster")."""
    redis_min_replicas: Annotated[int, Field(ge=0, le=5)] = 1
    """Redis Cluster: a batch's writes count as done (and its offsets may commit) only once this
    many replicas of each primary it wrote to hold them (``WAIT``), so a failover loses none;
    0 = do not wait (a failover may then lose the last writes before it)."""
    # Below the client's 10 s socket timeout, so a slow WAIT reads as NotReplicated.
    redis_replica_wait_ms: Annotated[int, Field(ge=10, le=5_000)] = 2000
    """How long one ``WAIT`` may take before the batch's write is retried."""
    redis_ttl_s: Annotated[int, Field(ge=0, le=MAX_TTL_S)] = 0
    """TTL of score hashes in seconds; 0 keeps them forever."""
    model: Path = Path("models/demo.pt")
    """Path of the TorchScript artifact (docs/INTERFACE.md, "Model artifact")."""
    model_watch_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    """How often the artifact file is checked for a change (mtime, size, inode), which reloads
    it as SIGHUP does; 0 = only on SIGHUP."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N; auto picks CUDA when present."""
    cpu_optimize: bool = True
    """On CPU, serve the artifact frozen and optimised for inference (batch norms folded, the
    convolutions run by oneDNN), if it scores a fixed probe like the original; false = as it
    was saved."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Most events scored in one micro-batch."""
    batch_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = 250
    """Longest wait for a micro-batch to fill before it is scored anyway."""
    decode_workers: Annotated[int, Field(ge=1, le=64)] = 4
    """Threads fetching and decoding audio (libsndfile releases the GIL)."""
    resample_on: Literal["auto", "pool", "device"] = "auto"
    """Where decoded audio is resampled: on the decode pool per item with libsoxr (the
    resampler training uses), or batched on the scoring device; auto = pool on every device,
    so a GPU pod scores an event as a CPU pod does."""
    max_inflight_batches: Annotated[int, Field(ge=1, le=16)] = 2
    """Batches decoded, scored or written but not yet committed; when all are busy the next
    batch keeps filling, and once it is full the partitions pause."""
    crash_limit: Annotated[int, Field(ge=0, le=10)] = 2
    """How many times the process may die (a native crash, the OOM killer) while processing one
    record alone before that record is dead-lettered as process_crashed; 0 turns the crash
    journal off (consumer.crashguard)."""
    max_event_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    """Largest Kafka value parsed as a ReleaseEvent; larger ones are dead-lettered."""
    max_future_skew_s: Annotated[float, Field(gt=0, le=366 * 86_400)] = 3600.0
    """How far ahead of this host's clock an event's emitted_at may be; later ones are
    dead-lettered (invalid_event): under newer-wins they would hold their track's score."""
    transactional_id: str | None = None
    """Kafka transactional.id of this instance; default popscore-<group>-<hostname>. Must be
    unique per running instance and stable across its restarts (a restart fences the old one)."""
    dedupe_ttl_s: Annotated[int, Field(ge=60, le=MAX_TTL_S)] = 7 * 86_400
    """How long an event id is remembered to drop re-deliveries of the same event."""
    shutdown_grace_s: Annotated[float, Field(ge=0, le=600)] = 30.0
    """On SIGTERM or a revoke, how long batches in hand may take to finish and commit."""
    http_port: Annotated[int, Field(ge=0, le=65_535)] = 9400
    """Port of /metrics, /healthz, /readyz; 0 picks a free one."""
    input_topic: str = "releases"
    """Topic of ReleaseEvent JSON."""
    output_topic: str = "release-scores"
    """Topic the ScoreRecords go to."""
    dlq_topic: str = "releases-dlq"
    """Dead-letter topic: original bytes plus reason headers."""
    group_id: str = "popscore"
    """Kafka consumer group."""
    role: Literal["live", "backfill"] = "live"
    """live: the primary model writes the view before any promotion. backfill: it never does
    (only a current model's records reach the view), and the process yields to live traffic."""
    cpu_nice: Annotated[int, Field(ge=0, le=19)] = 0
    """Lower CPU priority of the whole process (Unix nice): a backfill on a host shared with
    live consumers lets the scheduler serve live first."""
    yield_to_group: str = ""
    """A consumer group (the live one) whose lag on POPSCORE_YIELD_TO_TOPIC pauses this
    consumer while above POPSCORE_YIELD_MAX_LAG; empty: never pause."""
    yield_to_topic: str = "releases"
    """The live group's input topic."""
    yield_max_lag: Annotated[int, Field(ge=0)] = 500
    """Live lag (records, all partitions) above which a yielding consumer pauses; keep it above
    what live replicas hold in hand (replicas x (POPSCORE_MAX_INFLIGHT_BATCHES + 1) x
    POPSCORE_BATCH_SIZE)."""
    shadow_model: Path | None = None
    """A second artifact scoring every batch beside the primary one, on the same decoded audio:
    its scores go to its own Redis namespace and to POPSCORE_SHADOW_TOPIC; it never fails a
    record or delays a score in Redis (docs/OPERATIONS.md, "Roll out a model")."""
    shadow_topic: str = "release-scores-shadow"
    """Topic the shadow model's ScoreRecords go to (in the batch's transaction)."""
    shadow_wait_ms: Annotated[int, Field(ge=0, le=60_000)] = 1000
    """How long a batch's commit waits for the shadow once the primary is done; a later shadow
    result stays out of the shadow topic (counted ``late``)."""
    audio_file_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    """Comma-separated folders file:// URIs may resolve into (after symlinks); empty refuses all."""
    audio_s3_buckets: Annotated[tuple[str, ...], NoDecode] = ()
    """Comma-separated buckets s3:// URIs may name; empty refuses all. Credentials, region and
    endpoint come from boto3's standard configuration (AWS_* variables, config files, roles)."""
    audio_allow_private_hosts: bool = False
    """Allow http(s) to loopback, private, link-local and metadata addresses."""
    audio_max_bytes: Annotated[int, Field(ge=1)] = 200 * 1024 * 1024
    """Largest audio file fetched or read, in bytes."""
    audio_max_seconds: Annotated[float, Field(gt=0, le=86_400)] = 1800.0
    """Longest audio accepted, in seconds (by its header)."""
    audio_fetch_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15.0
    """Deadline for fetching one audio file over http(s) or from S3."""
    ffmpeg_memory_mb: Annotated[int, Field(ge=FFMPEG_MIN_MB, le=65_536)] = 1024
    """Address space of each worker process that decodes MP4 or Matroska audio (one per decode
    thread that meets such a file): a file that needs more is dead-lettered."""
    ffmpeg_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    """Wall time one MP4 or Matroska file may take its worker; it is then stopped and the file
    dead-lettered."""
    drift_window: Annotated[int, Field(ge=1, le=100_000)] = 2000
    """How many of the latest scored events the drift gauges compare with the model's training
    data (docs/INTERFACE.md, "Metrics"); its memory is a few bytes per event and feature."""
    drift_min_events: Annotated[int, Field(ge=1)] = 200
    """Events (for a feature's PSI: present values) the drift window needs before its gauges
    are exported; at most POPSCORE_DRIFT_WINDOW. Fewer make PSI noise."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if problem := device_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        # redis-py's own parser: a bad URL fails start-up here, not at the first write. Its
        # message may quote a piece of the password (an unescaped "/" in it): not shown.
        try:
            parse_url(value.get_secret_value())  # type: ignore[no-untyped-call]
        except ValueError:
            raise ValueError(
                "not a URL redis-py can use (redis://, rediss:// or unix://; "
                "percent-encode / ? # @ in the password)"
            ) from None
        return value

    @field_validator("redis_cluster")
    @classmethod
    def _database_zero(cls, value: bool, info: ValidationInfo) -> bool:
        url = info.data.get("redis_url")
        if value and url is not None:
            db = int(parse_url(url.get_secret_value()).get("db", 0))  # type: ignore[no-untyped-call]
            if db != 0:
                raise ValueError(
                    f"POPSCORE_REDIS_URL names database {db}; a Redis Cluster has database 0 only"
                )
        return value

    @field_validator("shadow_model", mode="before")
    @classmethod
    def _no_shadow(cls, value: Any) -> Any:
        # An empty variable means none (a ConfigMap can blank what another one sets).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("audio_file_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(Path(p.strip()) for p in value.split(",") if p.strip())
        return value

    @field_validator("audio_s3_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(b.strip() for b in value.split(",") if b.strip())
        return value

    @field_validator("audio_s3_buckets")
    @classmethod
    def _bucket_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # A name no bucket can have is a typo: fail start-up, rather than dead-letter every
        # event of the bucket meant as uri_forbidden.
        for bucket in value:
            problem = bucket_name_problem(bucket)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("kafka_bootstrap", "group_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _brokers(cls, value: str) -> str:
        # librdkafka would take a malformed list and retry it for ever, start-up hanging
        # silently on init_transactions.
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        if not entries:
            raise ValueError("names no broker")
        for entry in entries:  # librdkafka skips empty entries too
            match = _BROKER.match(entry)
            if match is None or not 0 < int(match["port"] or 9092) < 65_536:
                raise ValueError(f"{entry[:100]!r} is not [protocol://]host[:port]")
        return value

    @field_validator("yield_to_group")
    @classmethod
    def _not_own_group(cls, value: str, info: ValidationInfo) -> str:
        if value and value == info.data.get("group_id"):
            # It would pause on its own lag, which then could never fall.
            raise ValueError("must not be this consumer's own POPSCORE_GROUP_ID")
        return value

    @field_validator(*_TOPIC_FIELDS, "yield_to_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if problem := topic_problem(value):
            raise ValueError(problem)
        return value

    @field_validator("drift_min_events")
    @classmethod
    def _within_window(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("drift_window")
        if window is not None and value > window:
            raise ValueError(f"must not exceed POPSCORE_DRIFT_WINDOW ({window})")
        return value

    def written_topics(self) -> dict[str, str]:
        """Variable -> topic, for every topic the service writes: results, dead letters and,
        with a shadow model, the shadow's scores."""
        written = {"POPSCORE_OUTPUT_TOPIC": self.output_topic, "POPSCORE_DLQ_TOPIC": self.dlq_topic}
        if self.shadow_model:
            written["POPSCORE_SHADOW_TOPIC"] = self.shadow_topic
        return written

    def instance_transactional_id(self) -> str:
        """The configured transactional.id, or one stable for this host and group."""
        return self.transactional_id or f"popscore-{self.group_id}-{socket.gethostname()}"

    @field_validator("kafka_properties", mode="before")
    @classmethod
    def _scalars_as_text(cls, value: Any) -> Any:
        # librdkafka takes every value as text; JSON's numbers and booleans are natural here.
        if not isinstance(value, dict):
            return value
        return {key: _as_text(key, item) for key, item in value.items()}

    @field_validator("kafka_properties")
    @classmethod
    def _roles_name_a_property(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key, secret in value.items():
            role, _, rest = key.partition(".")
            if not key.strip() or (role in KAFKA_ROLES and not rest):
                raise ValueError(f"{key!r} names no librdkafka property")
            if why := _owned_by_popscore(key, secret.get_secret_value()):
                raise ValueError(f"{key!r} is popscore's to set ({why})")
        return value

    @field_validator("transactional_id", mode="before")
    @classmethod
    def _blank_id_is_unset(cls, value: Any) -> Any:
        # A templated manifest often renders an unset value as "": the default then.
        return None if isinstance(value, str) and not value.strip() else value

    def kafka_config(self, role: KafkaRole) -> dict[str, str]:
        """librdkafka properties of one kind of client: the bootstrap servers, every unprefixed
        property, then the ones prefixed with ``role.`` (which win over an unprefixed twin)."""
        shared: dict[str, str] = {"bootstrap.servers": self.kafka_bootstrap}
        own: dict[str, str] = {}
        for key, secret in self.kafka_properties.items():
            prefix, _, rest = key.partition(".")
            if prefix not in KAFKA_ROLES:
                shared[key] = secret.get_secret_value()
            elif prefix == role:
                own[rest] = secret.get_secret_value()
        return {**shared, **own}


def _owned_by_popscore(key: str, value: str) -> str | None:
    """Why popscore sets the property ``key`` (role-prefixed or not) names itself, unless
    ``value`` restates popscore's own or no client it reaches gets it from popscore."""
    role, _, rest = key.partition(".")
    name, roles = (rest, {role}) if role in KAFKA_ROLES else (key, set(KAFKA_ROLES))
    owned = OWNED_PROPERTIES.get(name)
    if owned is None or not roles & set(owned.roles):
        return None
    return None if value.strip().lower() == owned.value else owned.why


def _as_text(key: str, item: Any) -> Any:
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return str(item)
    if not isinstance(item, str | SecretStr):
        raise ValueError(f"{key!r}: expected a string, number or boolean")
    return item


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; a bad value raises ConfigError naming its variable in one line.
    A ``POPSCORE_*`` variable no setting reads is logged: a typo would be ignored silently."""
    _warn_unknown(os.environ)
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:
        # Raised before validation when a JSON-typed variable is not JSON.
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else "?"
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: not valid JSON") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        shown = "" if field in _SECRET_FIELDS else f" (got {first.get('input')!r})"
        message = first["msg"].removeprefix("Value error, ")  # pydantic's, not ours
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {message}{shown}") from None
    check_distinct_topics(settings)
    return settings


def check_distinct_topics(settings: Settings) -> None:
    """The same topic twice loops: dead letters read back as input, scores as bad events
    (ConfigError). Start-up checks the environment's; ``backfill run`` its derived ones."""
    seen: dict[str, str] = {}
    for field in _TOPIC_FIELDS:
        topic = getattr(settings, field)
        if topic in seen:
            raise ConfigError(
                f"{ENV_PREFIX}{field.upper()}: {topic!r} is already "
                f"{ENV_PREFIX}{seen[topic].upper()}; the topics must differ"
            )
        seen[topic] = field


_WARNED: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """Once per name and process; POPSCORE_TEST_* are the test suite's own knobs."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = {
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not name.upper().startswith(ENV_PREFIX + "TEST_")
    }
    for name in sorted(unknown - _WARNED):
        _WARNED.add(name)
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("%s is not a popscore setting and is ignored%s", name, hint)
