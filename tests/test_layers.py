"""The layers import downward only: serving → engine → checkpoints → model.

Every import in each package's files counts, lazy ones inside functions
included (they run upward just the same when called).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["model", "checkpoints", "engine", "serving"]  # bottom to top


def _imported_packages(path: Path) -> set[str]:
    """The top-level package of every absolute import in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:]) | {"bench", "tests"}
    offenders = {str(path.relative_to(REPO)): sorted(_imported_packages(path) & above)
                 for path in sorted((REPO / layer).rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_engine_knows_nothing_of_http_or_openai():
    outside = {"litestar", "msgspec", "uvicorn", "openai", "prometheus_client"}
    offenders = {str(path.relative_to(REPO)): sorted(_imported_packages(path) & outside)
                 for path in sorted((REPO / "engine").rglob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from serving import server\n    import bench.serving\n")
    assert _imported_packages(module) == {"serving", "bench"}
