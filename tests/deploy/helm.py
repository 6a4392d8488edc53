"""The Helm chart deploy/helm/balansis rendered offline by Helm's own Go SDK (helm-python-sdk): no cluster, no
helm binary. tests/deploy/test_helm_chart.py checks what it renders; other checks import `rendered_objects`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart

from tests.deploy.conftest import DEPLOY

CHART = DEPLOY / "helm" / "balansis"
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "demo"
NAMESPACE = "llm"


def load_values(values_file: Path) -> dict[str, Any]:
    return yaml.safe_load(values_file.read_text()) or {}


def render(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    """The Kubernetes objects `helm template` would print for these values (NOTES.txt left out). Raises
    helm_python.HelmValuesError for values the chart's schema refuses, HelmRenderError for a template error."""
    with Chart.load(chart) as loaded:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    return [obj for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for obj in yaml.safe_load_all(text) if obj]


@functools.cache
def _rendered_text(values_file: Path) -> str:
    return yaml.safe_dump_all(render(load_values(values_file)))


def rendered_objects(values_file: Path) -> list[dict[str, Any]]:
    """The objects the chart renders with one of VALUES_FILES (rendered once; a fresh copy each call)."""
    return list(yaml.safe_load_all(_rendered_text(values_file)))
