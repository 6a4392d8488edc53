"""Every YAML file under deploy/ passes yamllint (deploy/.yamllint.yml; Helm templates excluded)."""

from __future__ import annotations

import subprocess

from tests.deploy.conftest import DEPLOY, tool


def test_yamllint_finds_nothing():
    result = subprocess.run([tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yml"), str(DEPLOY)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_catches_a_broken_copy(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n     rules: []\n")  # bad indentation
    result = subprocess.run([tool("yamllint"), "-c", str(DEPLOY / ".yamllint.yml"), str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "syntax error" in result.stdout
