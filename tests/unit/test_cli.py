"""The CLI: --help everywhere, bad arguments and bad settings exit 2 with one line."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from popscore.cli.main import main
from schemas import ScoreRecord

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args", [[], ["consume"], ["produce"], ["score"]])
def test_help_everywhere(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    assert "usage: popscore" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["produce"],
        ["produce", "--synthetic", "0"],
        ["produce", "--synthetic", "ten"],
        ["produce", "--synthetic", "3", "--file", "x.jsonl"],
        ["produce", "--file", "/no/such/file.jsonl"],
        ["score", "/no/such.wav"],
        ["consume", "--bogus"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popscore")


@pytest.mark.parametrize("module", ["popscore", "consumer"])  # consumer: the old name, kept
def test_python_dash_m_is_the_command(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: popscore")
    for command in ("consume", "produce", "score", "replay-dlq", "bench", "train", "evaluate"):
        assert command in done.stdout


def test_score_features_must_be_a_json_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"")
    with pytest.raises(SystemExit) as info:
        main(["score", str(audio), "--features", "[1, 2]"])
    assert info.value.code == 2
    assert "JSON object" in capsys.readouterr().err


def consume_with(settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`popscore consume` in a fresh process with only these POPSCORE_* settings."""
    return subprocess.run(
        [sys.executable, "-m", "popscore", "--log-level", "WARNING", "consume"],
        env={"PATH": "/usr/bin:/bin", **settings},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bad_setting_fails_start_up_naming_the_variable() -> None:
    proc = consume_with({"POPSCORE_BATCH_SIZE": "-4"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "POPSCORE_BATCH_SIZE" in proc.stderr


@pytest.mark.parametrize(
    ("properties", "line"),
    [
        ('{"consumer.bogus.prop": "1"}', 'No such configuration property: "bogus.prop"'),
        ('{"producer.bogus.prop": "1"}', 'No such configuration property: "bogus.prop"'),
        (
            '{"producer.enable.idempotence": "false"}',
            "'producer.enable.idempotence' is popscore's to set (a retried send "
            "never writes a record twice)",
        ),
    ],
)
def test_a_kafka_property_refused_fails_start_up(properties: str, line: str) -> None:
    """Refused by popscore or when the clients are built, before any broker is needed (none
    listens here)."""
    proc = consume_with(
        {
            "POPSCORE_HTTP_PORT": "0",
            "POPSCORE_KAFKA_BOOTSTRAP": "127.0.0.1:1",
            "POPSCORE_KAFKA_PROPERTIES": properties,
        }
    )
    assert proc.returncode == 2
    # librdkafka may log a failed connection attempt first; the verdict is the last line
    assert proc.stderr.strip().splitlines()[-1] == f"popscore: POPSCORE_KAFKA_PROPERTIES: {line}"
    assert "Traceback" not in proc.stderr


def test_a_taken_http_port_fails_start_up_before_any_client_is_built() -> None:
    """Before the model loads and before init_transactions could fence a running instance."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = consume_with({"POPSCORE_HTTP_PORT": str(port), "POPSCORE_MODEL": "/nonexistent"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"popscore: POPSCORE_HTTP_PORT: cannot listen on {port}: Address already in use"
    )


def test_sigterm_while_starting_stops_the_process() -> None:
    """As PID 1 of a container an unhandled SIGTERM is ignored: `consume` handles it from
    the start. A broker that never answers keeps it starting."""
    env = {"PATH": "/usr/bin:/bin", "POPSCORE_HTTP_PORT": "0",
           "POPSCORE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # fmt: skip
    command = [sys.executable, "-m", "popscore", "consume"]
    with subprocess.Popen(command, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:  # the model is loaded: it is connecting
            if "serving" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in proc.stderr.read()


def test_score_prints_a_score_record(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = np.arange(3 * 22_050) / 22_050
    sf.write(tmp_path / "song.ogg", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22_050)
    features = '{"artist": {"followers": 5000, "popularity": 40}}'
    code = main(
        [
            "score",
            str(tmp_path / "song.ogg"),
            "--features",
            features,
            "--model",
            str(artifact),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert err.startswith("model tiny-test: trained on") and err[-1] == "\n"
    record = ScoreRecord.from_json(out)
    assert record.track_id == "song" and record.model_version == "tiny-test"
    assert 0 <= record.popularity <= 100


def test_a_model_that_cannot_load_is_one_line_naming_the_flag_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(2_000, dtype=np.float32), 8_000)
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not an artifact")
    with pytest.raises(SystemExit) as info:
        main(["score", str(audio), "--model", str(bogus), "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("popscore: error: --model: cannot load model artifact")
    assert err.count("\n") == 1


def test_the_bench_cleans_up_after_every_mode_that_goes_through_kafka() -> None:
    from popscore.cli.bench import DEFAULT_MODES, KAFKA_MODES, MODES

    assert set(MODES) >= KAFKA_MODES
    # Every mode outside KAFKA_MODES runs without a broker, so no topic is left for them:
    # decode and compute in-process, promote against Redis only.
    assert set(MODES) - KAFKA_MODES == {"decode", "compute", "compute_process", "promote"}
    assert set(DEFAULT_MODES) & KAFKA_MODES == {"e2e", "naive"}
