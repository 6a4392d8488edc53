"""Where every benchmark writes its JSON: `bench/results/<name>-<UTC timestamp>.json`."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_report(name: str, report: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Write `report` as `<name>-<timestamp>.json` under `results_dir`; returns the path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = results_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
