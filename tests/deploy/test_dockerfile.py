"""deploy/docker/Dockerfile: hadolint clean, and the properties operators rely on."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def hadolint_findings(path: Path) -> list[str]:
    result = subprocess.run([tool("hadolint"), "--format", "json", str(path)], capture_output=True, text=True,
                            timeout=60)
    return [f"{f['line']}: {f['code']} {f['message']}" for f in json.loads(result.stdout or "[]")]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def runtime_problems(text: str) -> list[str]:
    """What an operator's image must have, checked in the last stage (the one that runs)."""
    steps = instructions(text)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    runtime = dict(steps[last_from:])
    problems = []
    user = runtime.get("USER", "")
    if not re.fullmatch(r"[1-9][0-9]*:0", user):
        problems.append(f"USER {user!r}: want a numeric non-root user in group 0")
    if runtime.get("EXPOSE") != "8000":
        problems.append("no EXPOSE 8000")
    if runtime.get("STOPSIGNAL") != "SIGTERM":
        problems.append("no STOPSIGNAL SIGTERM")
    entrypoint = runtime.get("ENTRYPOINT", "")
    if not entrypoint.startswith("["):
        problems.append("ENTRYPOINT not in exec form: SIGTERM would reach a shell, not the server")
    elif json.loads(entrypoint)[:2] != ["balansis", "serve"]:
        problems.append(f"ENTRYPOINT {entrypoint}: want balansis serve")
    healthcheck = runtime.get("HEALTHCHECK", "")
    if "/health" not in healthcheck or "--start-period=" not in healthcheck:
        problems.append("no HEALTHCHECK on /health with a start period")
    if not all(volume in runtime.get("VOLUME", "") for volume in ('"/models"', '"/cache"')):
        problems.append("no /models and /cache volumes")
    if "XDG_CACHE_HOME=/cache" not in runtime.get("ENV", ""):
        problems.append("the compilation cache is not on the /cache volume")
    if not all(args.split()[0] == "${BASE_IMAGE}" for op, args in steps if op == "FROM"):
        problems.append("a stage's base is not the BASE_IMAGE build argument")
    return problems


def test_hadolint_finds_nothing():
    assert hadolint_findings(DOCKERFILE) == []


def test_the_runtime_stage_has_what_operators_rely_on():
    assert runtime_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("old, new, expected", [
    ("USER 10001:0", "USER root", "numeric non-root"),
    ('ENTRYPOINT ["balansis", "serve"]', "ENTRYPOINT balansis serve", "exec form"),
    ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGKILL", "STOPSIGNAL"),
    ("--start-period=600s ", "", "start period"),
])
def test_a_broken_copy_is_caught(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text
    assert any(expected in problem for problem in runtime_problems(text.replace(old, new)))


def test_hadolint_catches_a_broken_copy(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("FROM ${BASE_IMAGE} AS runtime", "FROM debian:latest AS runtime")
                      + "RUN apt-get update && apt-get install -y curl\n")
    codes = {finding.split()[1] for finding in hadolint_findings(broken)}
    assert {"DL3007", "DL3008"} <= codes  # :latest; unpinned apt packages


def test_dockerignore_keeps_the_context_small():
    ignored = (DEPLOY.parent / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("**")] == "**"  # everything out, then the packages back in
    assert {"!model/", "!checkpoints/", "!engine/", "!serving/", "!pyproject.toml"} <= set(ignored)
