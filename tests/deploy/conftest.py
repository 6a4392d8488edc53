"""Shared by the deployment checks: where deploy/ is, and the offline tools they run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def tool(name: str) -> str:
    """The path of a checker installed beside this Python (the venv's bin) or on PATH. A missing
    one skips the test, except under CI=true, where every tool must be there."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        message = f"{name} is not installed (make install-test installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found
