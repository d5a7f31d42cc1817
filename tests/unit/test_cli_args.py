"""The CLI refuses a bad argument in one line, exit 2, naming the flag, and before any slow
work: argument types, backfill settings validated like the environment's, load errors."""

import argparse
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from consumer.errors import ConfigError, UsageError
from consumer.settings import Settings
from popscore.cli import argtypes
from popscore.cli.argtypes import settings_with
from popscore.cli.main import main
from popscore.cli.rollout import backfill_settings

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a broker or Redis: a stray client would fail to connect."""
    for name in [n for n in os.environ if n.startswith("POPSCORE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("POPSCORE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("POPSCORE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("POPSCORE_DEVICE", "cpu")


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `popscore ARGS` prints as it exits 2."""
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popscore"), err
    return err


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    path = tmp_path / "a.wav"
    sf.write(path, np.zeros(2_000, dtype=np.float32), 8_000)
    return path


# 1. backfill run


def run_args(model: Path, **given: object) -> argparse.Namespace:
    values: dict[str, object] = {"model": model, "topic": "releases-backfill", "group": None,
                                 "nice": 0, "yield_to": None, "http_port": 0}  # fmt: skip
    return argparse.Namespace(**{**values, **given})


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ({"http_port": 70_000}, "--http-port: Input should be less than or equal to 65535"),
        ({"group": " "}, "--group: must not be empty (got ' ')"),
        ({"group": "popscore"}, "--group: 'popscore' is the live group (POPSCORE_GROUP_ID)"),
        ({"topic": "release-scores-backfill"}, "--topic: 'release-scores-backfill' is its output"),
        ({"topic": "releases-dlq-backfill"}, "--topic: 'releases-dlq-backfill' is its dead-letter"),
        ({"topic": "release-scores-shadow"}, "--topic: 'release-scores-shadow' is POPSCORE_SHADOW"),
        ({"topic": "bad topic"}, "--topic: not a Kafka topic name"),
        # the message names the flags the user typed, not the variables they set
        ({"yield_to": "g", "group": "g"}, "--yield-to: must not be this consumer's own --group"),
    ],
)
def test_backfill_settings_are_validated_naming_the_flag(
    artifact: Path, given: dict[str, object], line: str
) -> None:
    with pytest.raises(UsageError) as info:
        backfill_settings(run_args(artifact, **given), Settings(), "v1")
    assert str(info.value).startswith(line)


def test_a_default_group_equal_to_the_live_one_is_refused(artifact: Path) -> None:
    live = Settings(group_id="popscore-backfill-v1")
    with pytest.raises(UsageError, match="--group: 'popscore-backfill-v1' is the live group"):
        backfill_settings(run_args(artifact), live, "v1")


def test_topics_the_environment_makes_collide_name_the_variables(artifact: Path) -> None:
    live = Settings(shadow_topic="release-scores-backfill")
    with pytest.raises(ConfigError, match="POPSCORE_SHADOW_TOPIC: 'release-scores-backfill'"):
        backfill_settings(run_args(artifact), live, "v1")


def test_backfill_settings_keep_secrets_and_types(artifact: Path) -> None:
    live = Settings(
        redis_url="redis://:s%2Fecret@redis:6379/0",  # type: ignore[arg-type]
        kafka_properties={"sasl.password": "pw"},  # type: ignore[dict-item]
        audio_file_roots=(Path("/data"),),
        audio_s3_buckets=("bucket-a",),
    )
    s = backfill_settings(run_args(artifact, group="bf", http_port=9401), live, "v1")
    assert s.redis_url.get_secret_value() == "redis://:s%2Fecret@redis:6379/0"
    assert s.kafka_config("consumer")["sasl.password"] == "pw"
    assert s.audio_file_roots == (Path("/data"),) and s.audio_s3_buckets == ("bucket-a",)
    assert s.model == artifact and s.shadow_model is None
    assert (s.input_topic, s.output_topic, s.group_id) == (
        "releases-backfill",
        "release-scores-backfill",
        "bf",
    )
    assert (s.role, s.http_port, s.yield_to_group) == ("backfill", 9401, "popscore")


def test_settings_with_names_a_variable_for_a_field_no_flag_set() -> None:
    with pytest.raises(ConfigError, match=r"^POPSCORE_OUTPUT_TOPIC: not a Kafka topic name"):
        settings_with(Settings(), {"output_topic": "x" * 250}, {"input_topic": "--topic"})


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--http-port", "70000"], "argument --http-port: must be at most 65535, got 70000"),
        (["--http-port", "-1"], "argument --http-port: must be at least 0"),
        (["--topic", "bad topic"], "argument --topic: not a Kafka topic name"),
        (["--group", " "], "--group: must not be empty"),
        (["--group", "popscore"], "--group: 'popscore' is the live group"),
        (["--topic", "release-scores-backfill"], "--topic: 'release-scores-backfill' is its"),
    ],
)
def test_backfill_run_refuses_bad_arguments_in_one_line(
    artifact: Path, extra: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert line in refused(["backfill", "run", "--model", str(artifact), *extra], capsys)


def test_backfill_run_refuses_an_artifact_that_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not an artifact")
    err = refused(["backfill", "run", "--model", str(bogus)], capsys)
    assert "--model: cannot load model artifact" in err


def test_a_taken_backfill_port_names_the_flag(
    artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import consumer.kafka

    monkeypatch.setattr(consumer.kafka, "ensure_topics", lambda *_, **__: None)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["backfill", "run", "--model", str(artifact), "--nice", "0", "--http-port"]
        err = refused([*args, str(port)], capsys)
    assert err == f"popscore: error: --http-port: cannot listen on {port}: Address already in use\n"


# 2 and 3. score and bench: --device, --model


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:-1", "cuda:", ""])
def test_score_and_bench_refuse_a_bad_device(
    audio: Path, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "argument --device: expected auto, cpu, cuda or cuda:N" in refused(
        ["score", str(audio), "--device", device], capsys
    )
    assert "argument --device" in refused(["bench", "--device", device], capsys)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3"])
def test_device_names_settings_take_are_taken(device: str) -> None:
    assert argtypes.device_name(device) == device


def test_score_refuses_a_missing_model_naming_the_flag(
    audio: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(["score", str(audio), "--model", "/no/such.pt"], capsys)
    assert "argument --model: no such file: /no/such.pt" in err


def test_a_missing_model_setting_names_the_variable(
    audio: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POPSCORE_MODEL", "/no/such.pt")
    err = refused(["score", str(audio)], capsys)
    assert err.startswith("popscore: POPSCORE_MODEL: model artifact /no/such.pt does not exist")


@NO_CUDA
def test_an_unavailable_device_names_the_flag_or_the_variable(
    audio: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["score", str(audio), "--model", str(artifact)]
    err = refused([*args, "--device", "cuda"], capsys)
    assert err.startswith("popscore: error: --device: device 'cuda' requested but CUDA")
    monkeypatch.setenv("POPSCORE_DEVICE", "cuda:0")
    err = refused(args, capsys)
    assert err.startswith("popscore: POPSCORE_DEVICE: device 'cuda:0' requested but CUDA")


def test_bench_refuses_a_model_that_cannot_load_before_building_its_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not an artifact")
    corpus = tmp_path / "corpus"
    args = ["bench", "--modes", "decode", "--model", str(bogus), "--corpus-dir", str(corpus)]
    assert "--model: cannot load model artifact" in refused(args, capsys)
    assert not corpus.exists()
    assert "argument --model: no such file" in refused(["bench", "--model", "/no.pt"], capsys)


# 4. produce


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["--max-seconds", "inf"], "argument --max-seconds: must be a positive finite number"),
        (["--min-seconds", "nan"], "argument --min-seconds: must be a positive finite number"),
        (["--min-seconds", "10", "--max-seconds", "5"], "--min-seconds must not exceed"),
        (["--out-dir", "FILE"], "--out-dir: not a folder: "),
        (["--out-dir", "FILE/audio"], "--out-dir: not a folder: "),
        (["--topic", "bad topic"], "argument --topic: not a Kafka topic name"),
    ],
)
def test_produce_refuses_bad_arguments_in_one_line(
    tmp_path: Path, extra: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    extra = [a.replace("FILE", str(tmp_path / "file")) for a in extra]
    assert line in refused(["produce", "--synthetic", "1", *extra], capsys)


def test_the_default_out_dir_is_checked_only_when_synthesizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from popscore.cli.main import build_parser

    monkeypatch.chdir(tmp_path)
    Path(".demo").write_text("")  # where the default folder would be made
    (tmp_path / "events.jsonl").write_text("{}\n")
    assert build_parser().parse_args(["produce", "--file", "events.jsonl"]).out_dir
    # a given one too: --file writes no audio
    args = ["produce", "--file", "events.jsonl", "--out-dir", ".demo/x"]
    assert build_parser().parse_args(args).out_dir == Path(".demo/x")
    err = refused(["produce", "--synthetic", "1"], capsys)
    assert err == "popscore: error: --out-dir: not a folder: .demo\n"


def test_a_cache_folder_that_exists_may_be_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench --corpus-dir: a corpus made before, mounted read-only, is only read."""
    monkeypatch.setattr(argtypes.os, "access", lambda *_: False)  # as a non-root user sees it
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write in"):
        argtypes.writable_dir(str(tmp_path))
    assert argtypes.folder_to_fill(str(tmp_path)) == tmp_path
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write in"):
        argtypes.folder_to_fill(str(tmp_path / "new"))


def test_an_out_dir_that_can_be_made_is_taken(tmp_path: Path) -> None:
    assert argtypes.writable_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert argtypes.writable_dir(str(tmp_path)) == tmp_path


# 5. bench's numbers and modes


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--clip", "-5"], "argument --clip: must be a positive finite number"),
        (["--clip", "0"], "argument --clip: must be a positive finite number"),
        (["--clip", "nan"], "argument --clip: must be a positive finite number"),
        (["--clip", "inf"], "argument --clip: must be a positive finite number"),
        (["--clip", "abc"], "argument --clip: not a number"),
        (["--batch-wait-ms", "-5"], "argument --batch-wait-ms: must be at least 0"),
        (["--seed", "-1"], "argument --seed: must be at least 0"),
        (["--batch-size", "5000"], "--batch-size: Input should be less than or equal to 4096"),
        (["--batch-wait-ms", "60001"], "--batch-wait-ms: Input should be less than or equal to"),
        (["--decode-workers", "65"], "--decode-workers: Input should be less than or equal to"),
        (["--modes", ","], "--modes names no mode"),
        (["--json", "FILE/x.json"], "argument --json: not a folder: "),
        (["--corpus-dir", "FILE"], "argument --corpus-dir: not a folder: "),
        # real audio is used as it is: a flag that would be ignored is refused
        (["--audio-dir", "TMP", "--format", "WAV"], "--format: describes synthesized audio"),
        (["--audio-dir", "TMP", "--channels", "1"], "--channels: describes synthesized audio"),
        (["--audio-dir", "TMP", "--clip", "5"], "--clip: describes synthesized audio"),
        (["--audio-dir", "TMP", "--unique-files", "3"], "--unique-files: describes synthesized"),
    ],
)
def test_bench_refuses_bad_arguments_before_any_work(
    tmp_path: Path, extra: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    corpus = tmp_path / "corpus"
    extra = [a.replace("FILE", str(tmp_path / "file")).replace("TMP", str(tmp_path))
             for a in extra]  # fmt: skip
    args = ["bench", "--modes", "decode", "--corpus-dir", str(corpus), *extra]
    assert line in refused(args, capsys)
    assert not corpus.exists()


def test_bench_clip_of_30_seconds_is_taken() -> None:
    from popscore.cli.main import build_parser

    assert build_parser().parse_args(["bench", "--clip", "30"]).clip == 30.0


# 6. output paths


def test_writable_path_checks_the_folder_it_would_be_written_in(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert argtypes.writable_path(str(tmp_path / "new" / "r.json")) == tmp_path / "new" / "r.json"
    assert argtypes.writable_path("r.json") == Path("r.json")
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        argtypes.writable_path(str(tmp_path / "file" / "r.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        argtypes.writable_path(str(tmp_path / "file" / "deeper" / "r.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        argtypes.writable_path(str(tmp_path))


def test_writable_path_refuses_a_folder_it_cannot_write_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the image's user 10001 sees a read-only folder (root writes anywhere, so access()
    is answered as it would be for them)."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access
    monkeypatch.setattr(argtypes.os, "access", lambda path, mode: Path(path) != locked
                        and real_access(path, mode))  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write in"):
        argtypes.writable_path(str(locked / "r.json"))
    assert argtypes.writable_path(str(tmp_path / "r.json")) == tmp_path / "r.json"


def test_a_catalog_that_is_no_parquet_is_one_line_before_kafka(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """backfill publish: read before the topic is made (no broker listens here)."""
    monkeypatch.setenv("POPSCORE_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    (tmp_path / "bad.parquet").write_text("not parquet")
    args = ["backfill", "publish", "--catalog", str(tmp_path / "bad.parquet")]
    assert "--catalog: " in (err := refused(args, capsys))
    assert "is no readable Parquet file" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["promote", "a:b"], "no ':', no braces"),
        (["models", "--drop", "{x}"], "no ':', no braces"),
        (["promote", " "], "must not be blank"),
    ],
)
def test_a_malformed_model_version_is_a_bad_argument(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert needle in refused(args, capsys)


# 7. topic names


@pytest.mark.parametrize("topic", ["bad topic", ".", "..", "", "x" * 250, "t/opic"])
@pytest.mark.parametrize(
    "args",
    [
        ["produce", "--file", "FILE", "--topic"],
        ["backfill", "publish", "--catalog", "FILE", "--topic"],
        ["replay-dlq", "--dry-run", "--to-topic"],
        ["replay-dlq", "--dry-run", "--from-topic"],
    ],
)
def test_topic_flags_refuse_names_kafka_refuses(
    tmp_path: Path, args: list[str], topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "events.jsonl").write_text("{}\n")
    args = [a.replace("FILE", str(tmp_path / "events.jsonl")) for a in args]
    assert "not a Kafka topic name" in refused([*args, topic], capsys)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "{model}", "--out", "/etc/hostname/x.pt"], "--out: not a folder"),
        (["export", "{model}", "--out", "{tmp}/x.pt", "--hit-threshold", "500"], "0-100"),
        (["export", "{model}", "--out", "{tmp}/x.pt", "--hit-threshold", "nan"], "0-100"),
        (["export", "{model}", "--out", "{tmp}/x.pt", "--model-version", " "], "blank"),
        (
            [
                "train",
                "--synthetic",
                "40",
                "--no-evaluation",
                "--out",
                "{tmp}/x.pt",
                "--model-version",
                "a:b",
            ],
            "no ':'",
        ),
        (
            ["train", "--synthetic", "40", "--no-evaluation", "--out", "/etc/hostname/x.pt"],
            "--out: not a folder",
        ),
        (["evaluate", "--synthetic", "40", "--report", "/etc/hostname/r.json"], "--report"),
        (
            [
                "evaluate",
                "--synthetic",
                "40",
                "--report",
                "{tmp}/r.json",
                "--plots",
                "/etc/hostname",
            ],
            "--plots: not a folder",
        ),
        (
            ["prepare", "--data", "{model}", "--audio-column", "a", "--cache", "/etc/hostname"],
            "--cache: not a folder",
        ),
    ],
)
def test_model_commands_refuse_outputs_and_values_before_any_work(
    args: list[str],
    needle: str,
    artifact: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An output that cannot be written is refused before the training or evaluation whose
    result it was to hold, not after it."""
    line = refused([a.format(model=artifact, tmp=tmp_path) for a in args], capsys)
    assert needle in line


def test_a_prepared_cache_is_taken_without_a_write_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training only reads a prepared cache: a read-only volume will do."""
    (tmp_path / "complete.json").write_text("{}")

    def unwritable(text: str) -> Path:
        raise argparse.ArgumentTypeError(f"cannot write in {text}")

    monkeypatch.setattr(argtypes, "writable_dir", unwritable)
    assert argtypes.cache_dir(str(tmp_path)) == tmp_path
    with pytest.raises(argparse.ArgumentTypeError):
        argtypes.cache_dir(str(tmp_path / "not-prepared"))


@pytest.mark.parametrize(
    ("choice", "devices", "line"),
    [
        ("cuda", 0, "--device cuda, but no CUDA device is available"),
        ("cuda:1", 0, "--device cuda:1, but no CUDA device is available"),
        ("cuda:1", 1, "--device cuda:1, but this machine has 1 CUDA devices"),
    ],
)
def test_a_training_device_that_is_not_there_is_a_bad_argument(
    monkeypatch: pytest.MonkeyPatch, choice: str, devices: int, line: str
) -> None:
    import torch

    from popscore.training import jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    with pytest.raises(UsageError, match=re.escape(line)):
        jobs.resolve_device(choice)
    assert jobs.resolve_device("cpu") == "cpu"
    if devices:
        assert jobs.resolve_device("cuda:0") == "cuda:0"
