"""Settings: defaults, parsing, and one clear line naming the variable on a bad value."""

import json
from pathlib import Path

import pytest
import torch

from consumer.app import audio_policy, load_scorer
from consumer.errors import ConfigError
from consumer.settings import load_settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("POPSCORE_"):
            monkeypatch.delenv(name)
    s = load_settings()
    assert s.kafka_bootstrap == "localhost:9092"
    assert s.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert (s.input_topic, s.output_topic, s.dlq_topic) == (
        "releases",
        "release-scores",
        "releases-dlq",
    )
    assert (s.group_id, s.http_port, s.device) == ("popscore", 9400, "auto")
    assert s.model == Path("models/demo.pt")
    assert s.audio_file_roots == () and s.audio_allow_private_hosts is False


def test_roots_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPSCORE_AUDIO_FILE_ROOTS", "/a, /b/c,")
    assert load_settings().audio_file_roots == (Path("/a"), Path("/b/c"))


def test_kafka_properties_pass_through_and_stay_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "POPSCORE_KAFKA_PROPERTIES", '{"security.protocol": "SASL_SSL", "sasl.password": "hunter2"}'
    )
    s = load_settings()
    assert s.kafka_config("consumer")["sasl.password"] == "hunter2"
    assert "hunter2" not in repr(s)


def test_prefixed_kafka_properties_reach_only_their_kind_of_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "POPSCORE_KAFKA_PROPERTIES",
        json.dumps(
            {
                "security.protocol": "SASL_SSL",
                "linger.ms": "5",
                "consumer.session.timeout.ms": "6000",
                "producer.transaction.timeout.ms": "30000",
                "producer.linger.ms": "50",
                "admin.socket.timeout.ms": "9000",
            }
        ),
    )
    s = load_settings()
    base = {"bootstrap.servers": s.kafka_bootstrap, "security.protocol": "SASL_SSL"}
    assert s.kafka_config("consumer") == {**base, "linger.ms": "5", "session.timeout.ms": "6000"}
    assert s.kafka_config("producer") == {
        **base,
        "linger.ms": "50",  # the prefixed one wins
        "transaction.timeout.ms": "30000",
    }
    assert s.kafka_config("admin") == {**base, "linger.ms": "5", "socket.timeout.ms": "9000"}


@pytest.mark.parametrize("key", ["consumer.", "producer.", "admin.", " "])
def test_a_kafka_property_key_must_name_a_property(
    monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("POPSCORE_KAFKA_PROPERTIES", json.dumps({key: "hunter2"}))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("POPSCORE_KAFKA_PROPERTIES:")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("POPSCORE_BATCH_SIZE", "0"),
        ("POPSCORE_BATCH_SIZE", "many"),
        ("POPSCORE_DEVICE", "tpu"),
        ("POPSCORE_HTTP_PORT", "70000"),
        ("POPSCORE_AUDIO_ALLOW_PRIVATE_HOSTS", "perhaps"),
        ("POPSCORE_INPUT_TOPIC", " "),
        ("POPSCORE_AUDIO_MAX_SECONDS", "-1"),
        ("POPSCORE_FFMPEG_MEMORY_MB", "200"),  # a worker maps ~245 MB before it reads a file
        ("POPSCORE_FFMPEG_TIMEOUT_S", "0"),
        ("POPSCORE_REDIS_URL", ""),
        ("POPSCORE_REDIS_URL", "localhost:6379"),
        ("POPSCORE_REDIS_URL", "redis://h:port/0"),
        ("POPSCORE_REDIS_CLUSTER", "sometimes"),
        ("POPSCORE_REDIS_MIN_REPLICAS", "-1"),
        ("POPSCORE_REDIS_REPLICA_WAIT_MS", "0"),
        ("POPSCORE_REDIS_REPLICA_WAIT_MS", "60000"),
        # Lua writes these as 1e+17, which EXPIRE refuses: every write would fail
        ("POPSCORE_REDIS_TTL_S", "100000000000000000"),
        ("POPSCORE_DEDUPE_TTL_S", "100000000000000000"),
        ("POPSCORE_YIELD_TO_TOPIC", "bad topic!"),
        # librdkafka would retry these for ever: start-up hung without a word
        ("POPSCORE_KAFKA_BOOTSTRAP", "localhost:abc"),
        ("POPSCORE_KAFKA_BOOTSTRAP", ",,,"),
        ("POPSCORE_KAFKA_BOOTSTRAP", "-broker:9092"),
        ("POPSCORE_KAFKA_BOOTSTRAP", "http://localhost:9092"),
        ("POPSCORE_KAFKA_BOOTSTRAP", "broker:70000"),
        ("POPSCORE_YIELD_TO_GROUP", "popscore"),  # its own group: paused on its own lag
        # popscore's own properties: silently overridden, or overriding POPSCORE_KAFKA_BOOTSTRAP
        ("POPSCORE_KAFKA_PROPERTIES", '{"bootstrap.servers": "other:9092"}'),
        ("POPSCORE_KAFKA_PROPERTIES", '{"consumer.group.id": "g"}'),
        ("POPSCORE_KAFKA_PROPERTIES", '{"consumer.isolation.level": "read_uncommitted"}'),
        ("POPSCORE_KAFKA_PROPERTIES", '{"metadata.broker.list": "other:9092"}'),  # an alias
        ("POPSCORE_KAFKA_PROPERTIES", '{"consumer.partition.assignment.strategy": "range"}'),
        ("POPSCORE_KAFKA_PROPERTIES", '{"producer.enable.idempotence": false}'),
        # unprefixed, it would reach the transactional producer too, which sets "none"
        ("POPSCORE_KAFKA_PROPERTIES", '{"metadata.recovery.strategy": "rebootstrap"}'),
    ],
)
def test_bad_value_names_the_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(var + ":") and "\n" not in message


def test_a_cluster_url_naming_a_database_is_a_bad_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPSCORE_REDIS_CLUSTER", "true")
    monkeypatch.setenv("POPSCORE_REDIS_URL", "redis://127.0.0.1:7000/3")
    with pytest.raises(ConfigError, match=r"^POPSCORE_REDIS_CLUSTER: .*names database 3; a Redis"):
        load_settings()
    monkeypatch.setenv("POPSCORE_REDIS_URL", "redis://127.0.0.1:7000/0")
    assert load_settings().redis_cluster


def test_bad_secret_is_named_but_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPSCORE_KAFKA_PROPERTIES", "not-json-secret")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "POPSCORE_KAFKA_PROPERTIES" in str(info.value)
    assert "not-json-secret" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://user:hunter2@redis:6379/0", "redis://:hunter2/Qz@redis:6379/0"]
)
def test_a_bad_redis_url_is_named_but_not_echoed(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The second: an unescaped "/" in the password, which redis-py's message would quote."""
    monkeypatch.setenv("POPSCORE_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("POPSCORE_REDIS_URL:")
    assert "hunter2" not in str(info.value)


def test_a_missing_model_or_device_is_a_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^POPSCORE_MODEL: model artifact .* does not exist"):
        load_scorer(load_settings(model=tmp_path / "absent.pt"))
    with pytest.raises(ConfigError, match=r"^POPSCORE_MODEL: model artifact .* is a folder"):
        load_scorer(load_settings(model=tmp_path))
    with pytest.raises(ConfigError, match=r"^POPSCORE_MODEL: no model artifact given"):
        load_scorer(load_settings(model=""))
    (tmp_path / "junk.pt").write_bytes(b"not a TorchScript file")
    with pytest.raises(ConfigError, match=r"^POPSCORE_MODEL: "):
        load_scorer(load_settings(model=tmp_path / "junk.pt"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^POPSCORE_DEVICE: .*CUDA is not available"):
            load_scorer(load_settings(device="cuda"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POPSCORE_DLQ_TOPIC": "releases"}, "POPSCORE_DLQ_TOPIC: 'releases' is already "
         "POPSCORE_INPUT_TOPIC"),
        ({"POPSCORE_OUTPUT_TOPIC": "in", "POPSCORE_INPUT_TOPIC": "in"}, "POPSCORE_OUTPUT_TOPIC:"),
        ({"POPSCORE_INPUT_TOPIC": "bad topic!"}, "POPSCORE_INPUT_TOPIC: not a Kafka"),
        ({"POPSCORE_OUTPUT_TOPIC": ".."}, "POPSCORE_OUTPUT_TOPIC: not a Kafka"),
    ],
)  # fmt: skip
def test_topics_are_legal_and_distinct(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    # One topic for two roles loops: dead letters read back as input, scores as bad events.
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_kafka_properties_take_json_numbers_and_booleans(monkeypatch: pytest.MonkeyPatch) -> None:
    json = '{"linger.ms": 5, "enable.ssl.certificate.verification": false}'
    monkeypatch.setenv("POPSCORE_KAFKA_PROPERTIES", json)
    config = load_settings().kafka_config("producer")
    assert config["linger.ms"] == "5" and config["enable.ssl.certificate.verification"] == "false"
    monkeypatch.setenv("POPSCORE_KAFKA_PROPERTIES", '{"sasl.password": ["hunter2"]}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("POPSCORE_KAFKA_PROPERTIES:")
    assert "'sasl.password'" in str(info.value) and "hunter2" not in str(info.value)


def test_an_audio_root_that_is_not_a_folder_is_a_bad_setting(tmp_path: Path) -> None:
    assert audio_policy(load_settings(audio_file_roots=(tmp_path,))).file_roots == (
        tmp_path.resolve(),
    )
    with pytest.raises(ConfigError, match=r"^POPSCORE_AUDIO_FILE_ROOTS: '.*absent' is not a"):
        audio_policy(load_settings(audio_file_roots=(tmp_path, tmp_path / "absent")))


def test_the_ffmpeg_limits_reach_the_audio_policy() -> None:
    policy = audio_policy(load_settings(ffmpeg_memory_mb=512, ffmpeg_timeout_s=2.5))
    assert (policy.ffmpeg_limits.memory_mb, policy.ffmpeg_limits.timeout_s) == (512, 2.5)
    defaults = audio_policy(load_settings()).ffmpeg_limits
    assert (defaults.memory_mb, defaults.timeout_s) == (1024, 30.0)


def test_the_model_watch_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().model_watch_s == 0
    monkeypatch.setenv("POPSCORE_MODEL_WATCH_S", "2.5")
    assert load_settings().model_watch_s == 2.5
    monkeypatch.setenv("POPSCORE_MODEL_WATCH_S", "-1")
    with pytest.raises(ConfigError, match=r"^POPSCORE_MODEL_WATCH_S: "):
        load_settings()


@pytest.mark.parametrize(
    "servers",
    [
        "kafka",
        "b-1:9092,b-2:9092",
        " a:1 , b:2",
        "kafka:9092,",  # librdkafka skips empty entries
        "k:9092,,k2:9092",
        "SASL_SSL://b-1.example.com:9096",
        "[::1]:9092",
        "[fe80::1%eth0]:9092",
        "_kafka._tcp.example:9092",
        "broker.example.com.:9092",
    ],
)
def test_bootstrap_servers_take_every_form_librdkafka_reads(
    monkeypatch: pytest.MonkeyPatch, servers: str
) -> None:
    monkeypatch.setenv("POPSCORE_KAFKA_BOOTSTRAP", servers)
    assert load_settings().kafka_bootstrap == servers


def test_an_unknown_popscore_variable_is_named_with_the_likely_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """extra="ignore" would drop a typo silently, the default serving in its place."""
    monkeypatch.setattr("consumer.settings._WARNED", set())
    monkeypatch.setenv("POPSCORE_BATCHSIZE", "8")
    monkeypatch.setenv("POPSCORE_TEST_MODEL", "/x.pt")  # the test suite's own knob
    with caplog.at_level("WARNING", logger="consumer.settings"):
        assert load_settings().batch_size == 32
        load_settings()
    assert caplog.text.count("is not a popscore setting") == 1, "once per name"
    assert "POPSCORE_BATCHSIZE is not a popscore setting and is ignored; did you mean " \
        "POPSCORE_BATCH_SIZE?" in caplog.text  # fmt: skip


def test_restating_a_property_popscore_sets_the_same_way_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "POPSCORE_KAFKA_PROPERTIES",
        '{"consumer.isolation.level": "read_committed", "enable.auto.commit": false}',
    )
    assert load_settings().kafka_config("consumer")["isolation.level"] == "read_committed"


def test_a_property_popscore_sets_on_other_clients_only_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """popscore sets metadata.recovery.strategy on its producer alone."""
    monkeypatch.setenv(
        "POPSCORE_KAFKA_PROPERTIES", '{"consumer.metadata.recovery.strategy": "rebootstrap"}'
    )
    consumer = load_settings().kafka_config("consumer")
    assert consumer["metadata.recovery.strategy"] == "rebootstrap"


def test_a_blank_transactional_id_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POPSCORE_TRANSACTIONAL_ID", "")
    assert load_settings().instance_transactional_id().startswith("popscore-popscore-")
