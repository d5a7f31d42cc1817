"""The Dockerfile, checked without a Docker engine: its stages, user, entrypoint and
healthcheck, that it installs the same project and torch pins as pyproject.toml / `make
setup`, and that everything it COPYs exists and is not excluded by .dockerignore."""

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumer.health import Health, HealthServer
from tests.unit.deploy_helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: int
    op: str
    args: str


def parse(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined, numbered by build stage (0 = first FROM)."""
    lines, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        lines.append(buffer + line)
        buffer = ""
    out, stage = [], -1
    for line in lines:
        op, _, args = line.partition(" ")
        if op.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, op.upper(), args.strip()))
    return out


INSTRUCTIONS = parse()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def of(op: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.op == op and (stage is None or i.stage == stage)]


def last_stage() -> int:
    return max(i.stage for i in INSTRUCTIONS)


def runs(stage: int) -> str:
    return " && ".join(i.args for i in of("RUN", stage))


def pyproject_pin(package: str) -> str:
    [spec] = [d for d in PYPROJECT["project"]["dependencies"] if re.match(rf"{package}\b", d)]
    return spec.split("==", 1)[1]


def test_multi_stage_build_wheel_then_slim_runtime() -> None:
    froms = [i.args for i in of("FROM")]
    assert len(froms) >= 2
    assert re.fullmatch(r"python:3\.11-slim AS build", froms[0], re.IGNORECASE)
    assert re.fullmatch(r"python:3\.11-slim AS runtime", froms[-1], re.IGNORECASE)
    assert re.search(r"pip wheel .*--no-deps .*--wheel-dir /wheels \.$", runs(0))
    [copy] = [c for c in of("COPY", last_stage()) if c.args.startswith("--from=build")]
    assert "/wheels/popscore-*.whl" in copy.args


def test_runtime_installs_the_project_wheel_without_extras_and_torch_at_the_pinned_version() -> (
    None
):
    install = runs(last_stage())
    # `make setup` installs this same project (with the dev extras, which the image leaves out).
    setup = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[dev]'" in setup
    assert PYPROJECT["project"]["name"] == "popscore"
    assert re.search(r"pip install /tmp/wheels/popscore-\*\.whl(\s|$)", install)
    assert "[" not in install.split("popscore-*.whl", 1)[1].split("&&", 1)[0], "no extras"
    # torch and torchaudio come from PyTorch's index for the variant, at pyproject's pin.
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in of("ARG", last_stage())}
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_VERSION"] == pyproject_pin("torch") == pyproject_pin("torchaudio")
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"' in install
    assert '"torch==${TORCH_VERSION}" "torchaudio==${TORCH_VERSION}"' in install
    assert install.index("torch==") < install.index("popscore-*.whl"), "torch first"


def test_everything_copied_exists_and_is_not_dockerignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for copy in of("COPY"):
        words = [w for w in shlex.split(copy.args) if not w.startswith("--")]
        if copy.args.startswith("--from="):
            continue
        copied += words[:-1]
    assert copied
    for source in copied:
        assert list(ROOT.glob(source.rstrip("/"))), f"COPY {source}: no such path"
        assert not any(fnmatch.fnmatch(source.rstrip("/"), p) for p in ignored), source
    # The build stage copies every package setuptools packs but the benchmark, and the files
    # pyproject names.
    packages = [
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    for package in packages:
        assert any(c.startswith(f"{package}/") for c in copied), f"{package}/ is not copied"
    subpackages = {p.parent for p in (ROOT / "popscore").glob("*/__init__.py")}
    shipped = {ROOT / c.rstrip("/") for c in copied if c.startswith("popscore/")}
    assert subpackages - shipped == {ROOT / "popscore" / "bench"}, "all but the benchmark"
    assert "popscore/*.py" in copied
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= set(copied)


def test_non_root_user_entrypoint_and_port() -> None:
    stage = last_stage()
    [user] = of("USER", stage)
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "a numeric, non-root uid (runAsNonRoot can check it)"
    assert "--uid " + uid in runs(stage)
    [entry] = of("ENTRYPOINT", stage)
    [cmd] = of("CMD", stage)
    assert json.loads(entry.args) + json.loads(cmd.args) == ["popscore", "consume"]
    assert "popscore" in PYPROJECT["project"]["scripts"]
    envs = " ".join(i.args for i in of("ENV", stage))
    assert "POPSCORE_HTTP_PORT=9400" in envs and "POPSCORE_MODEL=/app/models/demo.pt" in envs
    assert [i.args for i in of("EXPOSE", stage)] == ["9400"]
    [workdir] = of("WORKDIR", stage)
    assert workdir.args == "/app"


def healthcheck_command() -> list[str]:
    [check] = of("HEALTHCHECK", last_stage())
    assert "--start-period=" in check.args
    command = check.args.split(" CMD ", 1)[1]
    argv: list[str] = json.loads(command)
    assert "curl" not in command and "wget" not in command, "python:3.11-slim has neither"
    assert "/healthz" in command
    return argv


@pytest.mark.parametrize("alive", [True, False])
def test_healthcheck_command_follows_healthz(alive: bool) -> None:
    """Run the HEALTHCHECK's exact command against the real /healthz server."""
    health = Health()
    health.started = True  # start-up over: /healthz says what the loop does
    if not alive:
        health._beat -= 10_000  # a main loop stalled long ago
    server = HealthServer(0, CollectorRegistry(), health).start()
    try:
        argv = healthcheck_command()
        assert argv[0] == "python"
        env = {**os.environ, "POPSCORE_HTTP_PORT": str(server.port)}
        done = subprocess.run(
            [sys.executable, *argv[1:]], env=env, check=False, capture_output=True, timeout=30
        )
    finally:
        server.close()
    assert (done.returncode == 0) is alive


def test_healthcheck_passes_saying_why_when_the_port_is_not_fixed() -> None:
    """POPSCORE_HTTP_PORT=0 lets the service pick a free port the check cannot know."""
    argv = healthcheck_command()
    env = {**os.environ, "POPSCORE_HTTP_PORT": "0"}
    done = subprocess.run(
        [sys.executable, *argv[1:]],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "no fixed port" in done.stdout


def test_models_are_root_owned_and_read_only() -> None:
    copies = [c.args for c in of("COPY", last_stage()) if "models/" in c.args]
    assert copies and all("--chown" not in c and "--chmod=0444" in c for c in copies)
