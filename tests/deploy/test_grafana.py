"""Grafana provisioning and dashboards (deploy/grafana), checked offline.

Each check is a function that returns the problems it finds. The real files must give
none, and a copy with one fault put in on purpose must give exactly one: the check can fail,
and only at the fault.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.deploy.dashboards import dashboard_expressions, load, panels, raw_expressions, substitute

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "balansis.yml"
# Where the compose file mounts deploy/grafana/dashboards in the Grafana container.
DASHBOARD_FOLDER = "/var/lib/grafana/dashboards"
DATASOURCE_VARIABLE = "${datasource}"

# Series with no model_name label: HTTP, access control, usage bookkeeping and devices.
UNMODELLED = re.compile(r"balansis:(http_|auth_failures|rate_limit|usage_records_dropped|device_memory_)")
# A rate function's first range; strings are blanked first, so a `[` in a label value does not count.
RATE_WINDOW = re.compile(r"\b(?:rate|irate|increase)\s*\([^\[]*\[([^\]]*)\]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')


def provisioned_uid() -> str:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return datasource["uid"]


def variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard.get("templating", {}).get("list", [])}


def structure_problems(dashboard: dict) -> list[str]:
    problems = [] if dashboard.get("uid") else ["the dashboard has no uid"]
    seen = set()
    for panel in panels(dashboard):
        title = panel.get("title")
        if panel.get("id") is None:
            problems.append(f"panel {title!r} has no id")
        elif panel["id"] in seen:
            problems.append(f"panel {title!r}: duplicate id {panel['id']}")
        seen.add(panel.get("id"))
        if "gridPos" not in panel:
            problems.append(f"panel {title!r} has no gridPos")
    return problems


def datasource_problems(dashboard: dict, uid: str) -> list[str]:
    """Every query goes through the `datasource` variable (or the provisioned uid), never an
    id that exists on one Grafana only."""
    problems = []

    def check(where: str, datasource) -> None:
        if not (isinstance(datasource, dict) and datasource.get("type") == "prometheus"
                and datasource.get("uid") in (DATASOURCE_VARIABLE, uid)):
            problems.append(f"{where}: datasource {datasource!r}, not {DATASOURCE_VARIABLE} or {uid}")

    for panel in panels(dashboard):
        title = panel.get("title")
        if panel.get("type") != "row" or "datasource" in panel:  # a row queries nothing
            check(f"panel {title!r}", panel.get("datasource"))
        for target in panel.get("targets", []):
            check(f"panel {title!r} target {target.get('refId')}", target.get("datasource"))
    for name, variable in variables(dashboard).items():
        if "datasource" in variable:
            check(f"variable {name}", variable["datasource"])
    chooser = variables(dashboard).get("datasource", {})
    if chooser.get("type") != "datasource" or chooser.get("query") != "prometheus":
        problems.append("no `datasource` variable choosing among Prometheus datasources")
    elif chooser.get("current", {}).get("value") != uid:
        problems.append(f"the datasource variable defaults to {chooser.get('current')!r}, not {uid}")
    return problems


def provisioned_datasource_problems(dashboard: dict) -> list[str]:
    return datasource_problems(dashboard, provisioned_uid())


def model_filter_problems(dashboard: dict) -> list[str]:
    """Every model's series is filtered by the `model_name` variable."""
    model = variables(dashboard).get("model_name", {})
    problems = [] if model.get("type") == "query" and model.get("multi") and model.get("includeAll") else \
        ["no multi-value `model_name` query variable with All"]
    for expr in raw_expressions(dashboard):
        try:  # $model_name stays: inside a label value it is valid PromQL
            ast = promql_parser.parse(substitute(expr, {"__rate_interval": "5m"}))
        except ValueError:
            continue  # syntax_problems reports it
        selectors = []
        promql_parser.walk(ast, lambda node: selectors.append(node)
                           if isinstance(node, promql_parser.VectorSelector) else None)
        for selector in selectors:
            name = selector.name or ""
            if not name.startswith("balansis:") or UNMODELLED.match(name):
                continue
            if not any(matcher.name == "model_name" and matcher.op == promql_parser.MatchOp.Re
                       and matcher.value == "$model_name" for matcher in selector.matchers.matchers):
                problems.append(f'{name} lacks model_name=~"$model_name" in: {expr}')
    return problems


def window_problems(dashboard: dict) -> list[str]:
    """Rates follow the panel's resolution ($__rate_interval), never a fixed window that is
    too short for a wide time range or shorter than the scrape interval allows."""
    problems = []
    for expr in raw_expressions(dashboard):
        for window in RATE_WINDOW.findall(STRING.sub('""', expr)):
            if window not in ("$__rate_interval", "${__rate_interval}"):
                problems.append(f"fixed window [{window}] in: {expr}")
    return problems


def syntax_problems(dashboard: dict) -> list[str]:
    problems = []
    for expr in raw_expressions(dashboard):
        try:
            promql_parser.parse(substitute(expr))
        except ValueError as error:
            problems.append(f"{error} in: {expr}")
    return problems


@pytest.fixture
def dashboard() -> dict:
    return load(GRAFANA / "dashboards" / "balansis.json")


def test_there_are_dashboards():
    assert DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_structure(path):
    assert structure_problems(load(path)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_datasources(path):
    assert provisioned_datasource_problems(load(path)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_model_filter(path):
    assert model_filter_problems(load(path)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_rate_windows(path):
    assert window_problems(load(path)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_promql_parses(path):
    assert syntax_problems(load(path)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_dashboard_expressions_are_plain_promql(path):
    expressions = dashboard_expressions(path)
    assert len(expressions) == len(raw_expressions(load(path)))
    assert not [expr for expr in expressions if "$" in expr]


def test_datasource_provisioning():
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["uid"]
    assert datasource["access"] == "proxy"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service


def test_dashboard_provider_reads_the_mounted_folder():
    config = yaml.safe_load(PROVIDER.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARD_FOLDER


def first_target(dashboard: dict, needle: str) -> dict:
    return next(target for panel in panels(dashboard) for target in panel.get("targets", [])
                if needle in target["expr"])


def first_panel(dashboard: dict) -> dict:
    return next(panel for panel in panels(dashboard) if panel["type"] != "row")


def duplicate_id(dashboard):
    panels(dashboard)[-1]["id"] = first_panel(dashboard)["id"]  # the last one sits inside a collapsed row


def hard_coded_panel_datasource(dashboard):
    first_panel(dashboard)["datasource"] = {"type": "prometheus", "uid": "abc123"}


def hard_coded_target_datasource(dashboard):
    first_target(dashboard, "balansis:")["datasource"] = {"type": "prometheus", "uid": "abc123"}


def other_default_datasource(dashboard):
    variables(dashboard)["datasource"]["current"]["value"] = "abc123"


def unfiltered_model(dashboard):
    target = first_target(dashboard, "balansis:time_to_first_token_seconds_bucket")
    target["expr"] = target["expr"].replace('{model_name=~"$model_name"}', "")


def syntax_error(dashboard):
    target = first_target(dashboard, "histogram_quantile")
    target["expr"] = target["expr"].removesuffix(")")


def fixed_window(dashboard):
    target = first_target(dashboard, "$__rate_interval")
    target["expr"] = target["expr"].replace("$__rate_interval", "5m")


@pytest.mark.parametrize("corrupt, check", [
    (duplicate_id, structure_problems),
    (hard_coded_panel_datasource, provisioned_datasource_problems),
    (hard_coded_target_datasource, provisioned_datasource_problems),
    (other_default_datasource, provisioned_datasource_problems),
    (unfiltered_model, model_filter_problems),
    (syntax_error, syntax_problems),
    (fixed_window, window_problems),
], ids=lambda function: function.__name__)
def test_a_broken_copy_is_caught(dashboard, corrupt, check):
    assert check(dashboard) == []
    broken = copy.deepcopy(dashboard)
    corrupt(broken)
    assert len(check(broken)) == 1
