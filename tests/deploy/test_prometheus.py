"""deploy/prometheus: promtool accepts the config and rules, and its unit tests pass (one firing
and one silent case per alert); every expression parses and every alert has a test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

from tests.deploy.conftest import DEPLOY, tool

PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rules(paths=RULE_FILES) -> list[dict]:
    return [rule for path in paths for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_scrape_config():
    result = promtool("check", "config", "--syntax-only", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_unit_tests_pass():
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_expression_parses():
    for rule in rules():
        promql_parser.parse(rule["expr"])


def test_each_alert_has_a_firing_and_a_silent_case():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    firing, silent = set(), set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts and firing == alerts and silent == alerts


def test_the_issue_s_alerts_are_there():
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {"BalansisTimeToFirstTokenHigh", "BalansisInterTokenLatencyHigh", "BalansisEndToEndLatencyHigh",
            "BalansisQueueGrowing", "BalansisKVCacheNearlyFull", "BalansisPreemptionsHigh", "BalansisRequestErrors",
            "BalansisTargetDown"} <= alerts


def broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    """deploy/prometheus copied to tmp_path with `old` replaced by `new` in the alert rules."""
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, copy)
    alerts = copy / "rules" / "balansis-alerts.yml"
    assert old in alerts.read_text()
    alerts.write_text(alerts.read_text().replace(old, new))
    return copy


def test_a_rule_that_never_fires_fails_its_unit_test(tmp_path):
    copy = broken_copy(tmp_path, "balansis:kv_cache_usage_perc > 0.9", "balansis:kv_cache_usage_perc > 9")
    result = promtool("test", "rules", "tests/balansis-alerts.test.yml", cwd=copy)
    assert result.returncode != 0 and "BalansisKVCacheNearlyFull" in result.stdout + result.stderr


def test_a_rule_that_does_not_parse_is_refused(tmp_path):
    copy = broken_copy(tmp_path, "rate(balansis:num_preemptions_total[5m]) > 1",
                       "rate(balansis:num_preemptions_total[5m] > 1")
    assert promtool("check", "rules", str(copy / "rules" / "balansis-alerts.yml")).returncode != 0
    with pytest.raises(Exception):
        for rule in rules(sorted((copy / "rules").glob("*.yml"))):
            promql_parser.parse(rule["expr"])
