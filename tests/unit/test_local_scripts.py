"""deploy/local/lib.sh, the helpers every local-stack script shares, run in bash without
starting a service: a pid file only counts when it names a live process of the expected
command, so no script ever signals a process that reused a stale pid."""

import re
import subprocess
from pathlib import Path

import pytest

from tests.unit.deploy_helpers import DEPLOY

LIB = DEPLOY / "local" / "lib.sh"


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{LIB}"; {script}'],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def sleeper(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A live process that is not a service of ours (as after a reboot reuses a pid)."""
    process = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "service.pid"
    pidfile.write_text(f"{process.pid}\n")
    yield pidfile, process
    process.kill()
    process.wait()


@pytest.mark.parametrize(
    ("command", "alive"), [("sleep", True), ("java", False), ("redis-server", False)]
)
def test_pid_alive_needs_the_expected_command(
    sleeper: tuple[Path, subprocess.Popen[bytes]], command: str, alive: bool
) -> None:
    pidfile, _ = sleeper
    assert (bash(f'pid_alive "{pidfile}" {command}').returncode == 0) is alive


@pytest.mark.parametrize("content", ["", "not-a-pid\n", "999999999\n", None])
def test_pid_alive_is_false_for_a_missing_empty_garbled_or_dead_pid(
    tmp_path: Path, content: str | None
) -> None:
    pidfile = tmp_path / "service.pid"
    if content is not None:
        pidfile.write_text(content)
    assert bash(f'pid_alive "{pidfile}" sleep').returncode == 1


def test_stop_leaves_a_process_that_reused_the_pid_alone(
    sleeper: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    pidfile, process = sleeper
    done = bash(f'stop redis "{pidfile}" redis-server 1')
    assert done.returncode == 0, done.stderr
    assert "is not a running redis-server; stale pid file removed" in done.stdout
    assert process.poll() is None, "never signalled"
    assert not pidfile.exists()


def test_stop_stops_what_the_pid_file_names(
    sleeper: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    pidfile, process = sleeper
    done = bash(f'stop sleeper "{pidfile}" sleep 5')
    assert done.returncode == 0, done.stderr
    assert f"sleeper: stopped (pid {process.pid})" in done.stdout
    assert process.wait(timeout=5) != 0


def test_redis_cli_is_bounded_by_a_timeout() -> None:
    """A hung Redis must not hang a script that holds the stack's lock."""
    done = bash("type rcli")
    assert "timeout 3 redis-cli" in done.stdout
    for script in ("stack-up.sh", "redis-cluster-up.sh"):
        text = (DEPLOY / "local" / script).read_text()
        calls = [line for line in text.splitlines() if re.search(r"\bredis-cli\s+-", line)]
        # The cluster's one-off create may take longer, and holds no shared lock.
        assert all("--cluster create" in line for line in calls), (script, calls)


@pytest.mark.parametrize("script", sorted(p.name for p in (DEPLOY / "local").glob("*.sh")))
def test_scripts_parse(script: str) -> None:
    done = subprocess.run(
        ["bash", "-n", str(DEPLOY / "local" / script)], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
