"""Every metric name a dashboard, an alert or recording rule, or the chart's autoscaler reads
exists in a live `balansis serve`'s /metrics (or is recorded by our own rules). A renamed
metric otherwise fails silently: an empty panel, an alert that can never fire."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.deploy.conftest import DEPLOY
from tests.deploy.dashboards import dashboard_expressions
from tests.deploy.helm import VALUES_FILES, rendered_objects
from tests.serving.conftest import free_port, wait_until_ready

REPO = DEPLOY.parent
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
# Only GPUs report device memory (serving/metrics.py): a CPU server cannot show these two.
GPU_ONLY = {"balansis:device_memory_used_bytes", "balansis:device_memory_limit_bytes"}
NAME = re.compile(r"\b(balansis:[a-zA-Z0-9_:]+|up)\b")


def exposed_names(exposition: str) -> set[str]:
    """The sample names /metrics can carry: from each family's TYPE line (a labelled family that
    has seen nothing yet has no samples, but has its TYPE)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}.get(kind, ("",))
        names |= {name + suffix for suffix in suffixes}
    return names


def rule_expressions() -> list[str]:
    return [rule["expr"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def autoscaler_expressions() -> list[str]:
    """The HPA's metric names and KEDA's queries, from the chart rendered with each values file, and the
    series the Prometheus adapter turns into the HPA's metric."""
    found = []
    for values in VALUES_FILES:
        for obj in rendered_objects(values):
            if obj["kind"] == "HorizontalPodAutoscaler":
                found += [m[m["type"].lower()]["metric"]["name"] for m in obj["spec"]["metrics"]
                          if m["type"] in ("Pods", "Object", "External")]
            elif obj["kind"] == "ScaledObject":
                found += [t["metadata"]["query"] for t in obj["spec"]["triggers"] if t["type"] == "prometheus"]
    adapter = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    found += [rule["seriesQuery"] for rule in adapter["rules"]["custom"]]  # what the HPA's metric reads
    return found


def unknown_names(expressions: list[str], known: set[str]) -> set[str]:
    return {name for expr in expressions for name in NAME.findall(expr)} - known - {"up"}


@pytest.fixture(scope="module")
def live_metric_names() -> set[str]:
    """/metrics of `balansis serve` on the default model after a chat and an embeddings request."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--no-warmup",
                                "--max-num-seqs", "4", "--max-model-len", "512", "--no-access-log",
                                "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_until_ready(url, [process]):
            pytest.fail(f"the server did not become ready: {process.communicate(timeout=10)[0][-3000:]}")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        client.embeddings.create(model=model, input="Hi")
        return exposed_names(httpx.get(url + "/metrics", timeout=30).text)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_gpu_only_metrics_are_the_servers_own():
    source = (REPO / "serving" / "metrics.py").read_text()
    assert all(f'"{name}"' in source for name in GPU_ONLY)


@pytest.mark.slow
def test_every_metric_name_used_exists(live_metric_names):
    known = live_metric_names | recorded_names() | GPU_ONLY
    dashboards = [expr for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
                  for expr in dashboard_expressions(path)]
    assert dashboards and autoscaler_expressions()
    for source, expressions in (("rules", rule_expressions()), ("dashboards", dashboards),
                                ("autoscalers", autoscaler_expressions())):
        assert unknown_names(expressions, known) == set(), source


@pytest.mark.slow
def test_a_bad_metric_name_is_caught(live_metric_names):
    known = live_metric_names | recorded_names() | GPU_ONLY
    assert unknown_names(["sum(rate(balansis:generation_token_total[5m]))"], known) == {
        "balansis:generation_token_total"}
    assert unknown_names(["balansis:time_to_first_token_seconds:p99_5m > 5"], known) == set()
