"""Grafana dashboards as tests read them: every panel (those inside rows too) and every
PromQL expression, with Grafana's variables replaced by values Prometheus accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

# A rate window Prometheus accepts, and the "All" choice of the model variable (its allValue).
GRAFANA_VALUES = {"__rate_interval": "5m", "model_name": ".*"}

# `$name`, `${name}` and `${name:format}`.
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel: a collapsed row holds its panels in its own `panels` list."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


def raw_expressions(dashboard: dict) -> list[str]:
    """Every target's PromQL as Grafana stores it, variables unreplaced."""
    return [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", [])
            if "expr" in target]


def substitute(expr: str, values: dict[str, str] = GRAFANA_VALUES) -> str:
    """Replace the variables `values` names; others stay, so an unknown one fails to parse."""
    return _VARIABLE.sub(lambda match: values.get(match[1] or match[2], match[0]), expr)


def dashboard_expressions(path: str | Path) -> list[str]:
    """Every PromQL expression of the dashboard at `path`, ready to send to Prometheus."""
    return [substitute(expr) for expr in raw_expressions(load(path))]
