"""`balansis convert` (HF safetensors or GGUF → our Orbax checkpoint folder) and
`balansis inspect`: round trips give the very same logits; bad paths, an
existing destination and an interrupted conversion leave nothing that loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints import orbax_dir
from checkpoints.errors import CheckpointError
from checkpoints.loader import load_model
from serving.cli import main as balansis
from tests.forward import logits_function
from tests.hf_reference import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
IDS = [1, 7, 42, 9, 200, 3, 3, 17]


def _logits(model) -> np.ndarray:
    return logits_function(model)([IDS])[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2):
    """A tiny random Llama (Qwen2-style QKV bias, to cover biases) with SmolLM2's tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-convert")
    save_tiny_model("qwen2", folder)
    smollm2.tokenizer.save(folder)
    return folder


def test_safetensors_round_trip_gives_the_same_bits(tiny_folder, tmp_path):
    destination = tmp_path / "orbax"
    assert balansis(["convert", str(tiny_folder), str(destination)]) == 0
    source, converted = load_model(tiny_folder), load_model(destination)
    assert converted.config == source.config
    assert _logits(converted.model).tobytes() == _logits(source.model).tobytes()
    # The tokenizer and its chat template came along.
    messages = [{"role": "user", "content": "Hi there"}]
    assert converted.tokenizer.encode_chat(messages) == source.tokenizer.encode_chat(messages)
    manifest = json.loads((destination / orbax_dir.MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["source"] == str(tiny_folder.absolute())


def test_bfloat16_conversion_equals_the_source_loaded_in_bfloat16(tiny_folder, tmp_path):
    destination = tmp_path / "orbax-bf16"
    assert balansis(["convert", str(tiny_folder), str(destination), "--dtype", "bf16"]) == 0
    converted = load_model(destination)
    assert converted.model.layers.q_proj[...].dtype == jnp.bfloat16
    source = load_model(tiny_folder, dtype=jnp.bfloat16)
    assert _logits(converted.model).tobytes() == _logits(source.model).tobytes()
    from checkpoints.inspect_model import describe

    tensors = describe(destination)["tensors"]
    assert {t["dtype"] for t in tensors} == {"bfloat16"}
    assert all(t["bytes"] == 2 * t["elements"] for t in tensors)


def test_gguf_round_trip_of_the_default_model(smollm2_path, smollm2, tmp_path):
    destination = tmp_path / "smollm2-orbax"
    assert balansis(["convert", str(smollm2_path), str(destination)]) == 0
    converted = load_model(destination)
    assert converted.config == smollm2.config
    assert _logits(converted.model).tobytes() == _logits(smollm2.model).tobytes()
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert converted.tokenizer.encode_chat(messages) == smollm2.tokenizer.encode_chat(messages)
    assert converted.tokenizer.eos_token_id == smollm2.tokenizer.eos_token_id

    # inspect: the same architecture and parameter count from either format.
    described = {}
    for path in (smollm2_path, destination):
        done = subprocess.run([sys.executable, "-m", "serving.cli", "inspect", str(path), "--json"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        described[path] = json.loads(done.stdout)
    gguf, orbax = described[smollm2_path], described[destination]
    assert gguf["parameters"] == orbax["parameters"] == sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(smollm2.model, nnx.Param)))
    assert gguf["config"] == orbax["config"]
    assert {t["dtype"] for t in orbax["tensors"]} == {"float32"}
    assert "Q4_1" in {t["dtype"] for t in gguf["tensors"]}


def test_inspect_prints_a_summary_of_a_safetensors_folder(tiny_folder, capsys):
    assert balansis(["inspect", str(tiny_folder)]) == 0
    out = capsys.readouterr().out
    assert "format:        HF safetensors" in out
    assert "architecture:  qwen2: 3 layers, hidden 64" in out
    assert "float32" in out


@pytest.mark.parametrize("command", [["convert", "/no/such/model.gguf", "{tmp}/out"], ["inspect", "/no/such"]])
def test_a_bad_path_is_a_clear_error(command, tmp_path, capsys):
    assert balansis([c.format(tmp=tmp_path) for c in command]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_destination_is_kept_unless_overwrite(tiny_folder, tmp_path, capsys):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    assert balansis(["convert", str(tiny_folder), str(destination)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert (destination / "keep.txt").read_text() == "mine"
    assert balansis(["convert", str(tiny_folder), str(destination), "--overwrite"]) == 0
    assert not (destination / "keep.txt").exists()
    assert load_model(destination).config.model_type == "qwen2"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial or stale folder left


def test_an_interrupted_conversion_leaves_nothing_that_loads(smollm2_path, tmp_path):
    """SIGKILL as soon as the conversion starts writing (the default model: seconds of writing)."""
    destination = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "serving.cli", "convert", str(smollm2_path), str(destination)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    partial = []
    while not partial and process.poll() is None and time.monotonic() < deadline:
        partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert partial, "the conversion never started writing"
    assert not destination.exists()
    for folder in partial:
        if folder.exists():
            with pytest.raises(CheckpointError):
                load_model(folder)
    # A new conversion to the same destination then works.
    assert balansis(["convert", str(smollm2_path), str(destination), "--dtype", "bf16"]) == 0
    assert load_model(destination).model.embed_tokens[...].dtype == jnp.bfloat16
