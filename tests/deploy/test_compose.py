"""deploy/compose: valid against the compose-spec schema (the one check-jsonschema ships), pinned
images, required secrets, health checks and the drain window. No container runs here: the
images cannot be pulled on these machines (deploy/test-image.sh runs the engine's own image)."""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import DEPLOY

COMPOSE = DEPLOY / "compose" / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "compose" / ".env.example"
SECRETS = ("BALANSIS_API_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def compose_spec() -> dict:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(schema.read_text())


def schema_problems(document: dict) -> list[str]:
    schema = compose_spec()
    validator = jsonschema.validators.validator_for(schema)(schema)  # draft 2020-12: unevaluatedProperties
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in re.findall(r"([\d.]+)([hms])", duration))


def policy_problems(document: dict, text: str) -> list[str]:
    problems = []
    for name, service in document["services"].items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image.split("/")[-1] else ""
        if not re.search(r"\d", tag) or tag == "latest":
            problems.append(f"{name}: image {image!r} is not pinned to a version")
        if "healthcheck" not in service and name in ("engine", "postgres", "redis"):
            problems.append(f"{name}: no healthcheck")
    for secret in SECRETS:
        if not re.search(r"\$\{" + secret + r":\?", text):
            problems.append(f"{secret} is not required (${{{secret}:?…}})")
    engine = document["services"]["engine"]
    drain = float(engine["environment"]["BALANSIS_DRAIN_TIMEOUT"])
    if seconds(engine.get("stop_grace_period", "10s")) <= drain:
        problems.append("engine: stop_grace_period does not exceed the drain timeout")
    if engine.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("engine: does not wait for a healthy postgres")
    if "pg_isready" not in document["services"]["postgres"]["healthcheck"]["test"]:
        problems.append("postgres: the healthcheck is not pg_isready")
    devices = engine.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in device.get("capabilities", []) for device in devices):
        problems.append("engine: no GPU reservation")
    if document["services"].get("redis", {}).get("profiles") != ["redis"]:
        problems.append("redis: not behind the redis profile")
    return problems


def test_compose_file_matches_the_compose_spec():
    assert schema_problems(yaml.safe_load(COMPOSE.read_text())) == []


def test_compose_file_follows_our_policy():
    text = COMPOSE.read_text()
    assert policy_problems(yaml.safe_load(text), text) == []


def test_every_variable_is_in_env_example():
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    documented = {line.split("=", 1)[0].lstrip("# ") for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line}
    assert used <= documented, used - documented


def test_mounted_files_exist():
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../"):
                assert (COMPOSE.parent / source).exists(), source


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d["services"]["grafana"].update(image="docker.io/grafana/grafana:latest"), "not pinned"),
    (lambda d: d["services"]["engine"].pop("healthcheck"), "engine: no healthcheck"),
    (lambda d: d["services"]["engine"].update(stop_grace_period="10s"), "stop_grace_period"),
    (lambda d: d["services"]["engine"]["depends_on"]["postgres"].update(condition="service_started"), "healthy"),
])
def test_a_broken_copy_breaks_the_policy(breakage, expected):
    document = yaml.safe_load(COMPOSE.read_text())
    broken = copy.deepcopy(document)
    breakage(broken)
    assert any(expected in problem for problem in policy_problems(broken, COMPOSE.read_text()))


def test_a_broken_copy_breaks_the_schema():
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["engine"]["stop_grace_period"] = 45  # a duration is a string
    broken["services"]["engine"]["restart_policy"] = "always"  # not a service key
    problems = schema_problems(broken)
    assert any("stop_grace_period" in p for p in problems) and any("restart_policy" in p for p in problems)


def test_a_secret_with_a_default_is_caught():
    text = COMPOSE.read_text().replace("${GRAFANA_ADMIN_PASSWORD:?", "${GRAFANA_ADMIN_PASSWORD:-admin")
    assert any("GRAFANA_ADMIN_PASSWORD" in p for p in policy_problems(yaml.safe_load(text), text))
