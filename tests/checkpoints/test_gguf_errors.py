"""Unusable GGUF files give a `CheckpointError` whose one-line message names the
file and the problem, from the GGUF loader, from `load_model`, and from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from checkpoints.errors import CheckpointError
from checkpoints.gguf_file import load_decoder
from checkpoints.loader import load_model
from tests.gguf_writer import Q, write_tiny_llama_gguf

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(excinfo, path: Path, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensor_type=Q.Q8_0,
                                 num_hidden_layers=1)


@pytest.fixture(scope="module")
def data_offset(valid_gguf) -> int:
    """Where the first tensor's data starts: everything before it is header, metadata, tensor infos."""
    return min(t.data_offset for t in gguf.GGUFReader(valid_gguf).tensors)


@pytest.mark.parametrize("load", [load_decoder, load_model], ids=["load_decoder", "load_model"])
def test_unknown_architecture(load, tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "gpt2.gguf", architecture="gpt2", num_hidden_layers=1)
    with pytest.raises(CheckpointError) as excinfo:
        load(path)
    _one_line_error(excinfo, path, "unknown architecture", "'gpt2'", "llama")


@pytest.mark.parametrize("load", [load_decoder, load_model], ids=["load_decoder", "load_model"])
def test_unsupported_quantisation_type(load, tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "q2k.gguf", num_hidden_layers=1,
                                 type_overrides={"blk.0.ffn_up.weight": Q.Q2_K})
    with pytest.raises(CheckpointError) as excinfo:
        load(path)
    _one_line_error(excinfo, path, "'blk.0.ffn_up.weight'", "Q2_K", "not supported")


# Where to cut the valid file, given its size and where its tensor data starts.
CUTS = {
    "in-header": lambda size, data_at: 12,  # after the magic and version, inside the counts
    "in-metadata": lambda size, data_at: data_at * 3 // 10,
    "in-tensor-infos": lambda size, data_at: data_at - 40,
    "at-tensor-data": lambda size, data_at: data_at,
    "in-tensor-data": lambda size, data_at: (data_at + size) // 2,
    "last-byte-missing": lambda size, data_at: size - 1,
}


@pytest.mark.parametrize("load", [load_decoder, load_model], ids=["load_decoder", "load_model"])
@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_file(cut, load, valid_gguf, data_offset, tmp_path):
    data = valid_gguf.read_bytes()
    at = CUTS[cut](len(data), data_offset)
    assert 4 <= at < len(data)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:at])
    with pytest.raises(CheckpointError) as excinfo:
        load(path)
    _one_line_error(excinfo, path, "truncated")


def test_the_uncut_file_loads(valid_gguf):
    """Control for the truncation tests: the same file, whole, loads."""
    cfg, _ = load_decoder(valid_gguf)
    assert cfg.num_layers == 1


NOT_GGUF = {
    "text": b"hello, this is not a model\n",
    "ggjt": b"tjgg" + bytes(200),  # llama.cpp's pre-GGUF format
    "safetensors-like": (8).to_bytes(8, "little") + b'{"a": 1}',
    "empty": b"",
    "three-bytes": b"GGU",
}


@pytest.mark.parametrize("kind", sorted(NOT_GGUF))
def test_not_gguf_via_load_model(kind, tmp_path):
    path = tmp_path / "model.gguf"  # the name must not matter: the content decides
    path.write_bytes(NOT_GGUF[kind])
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    _one_line_error(excinfo, path, "not a model")


@pytest.mark.parametrize("kind", sorted(NOT_GGUF))
def test_not_gguf_via_load_decoder(kind, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(NOT_GGUF[kind])
    with pytest.raises(CheckpointError) as excinfo:
        load_decoder(path)
    _one_line_error(excinfo, path, "not a readable GGUF file")


def test_missing_path_via_load_model(tmp_path):
    path = tmp_path / "nowhere.gguf"
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    _one_line_error(excinfo, path, "no such file")


@pytest.mark.parametrize("overrides, needle", [
    ({"attention.head_count": None}, "incomplete llama metadata"),
    ({"block_count": None}, "incomplete llama metadata"),
    ({"rope.scaling.type": "yarn"}, "unsupported rope scaling type 'yarn'"),
    ({"feed_forward_length": 500}, "'model.layers.0.mlp.gate_proj.weight' has shape (512, 256), expected (500, 256)"),
], ids=["no-head-count", "no-block-count", "yarn", "wrong-ffn-length"])
def test_bad_metadata(overrides, needle, tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "bad.gguf", num_hidden_layers=1, metadata_overrides=overrides)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    _one_line_error(excinfo, path, needle)


def test_zero_head_count_without_head_dim_keys(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "h0.gguf", num_hidden_layers=1,
                                 metadata_overrides={"attention.head_count": 0, "rope.dimension_count": None})
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    _one_line_error(excinfo, path, "head")


def test_head_count_that_does_not_divide_q_rows(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "h3.gguf", num_hidden_layers=1,
                                 metadata_overrides={"attention.head_count": 3, "attention.head_count_kv": 3})
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    _one_line_error(excinfo, path, "q_proj")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("which", ["missing", "truncated"])
def test_cli_prints_one_line_and_exits_2(which, valid_gguf, tmp_path):
    if which == "missing":
        model = tmp_path / "BAD"
    else:
        model = tmp_path / "truncated.gguf"
        model.write_bytes(valid_gguf.read_bytes()[:1000])
    result = _run_cli("generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "2")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("balansis: error: "), result.stderr
    assert str(model) in lines[0]
    assert result.stdout == ""
