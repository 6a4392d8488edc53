"""HF safetensors folders: sharded index, bfloat16 weights, and every bad input
giving a one-line CheckpointError that names the problem."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints.errors import CheckpointError
from checkpoints.loader import load_model
from checkpoints.safetensors_dir import load_decoder
from tests.forward import PagedForward
from model.kv_cache import KVCache
from tests.hf_reference import hf_logits, save_tiny_model

PROMPT = [3, 141, 59, 26, 53, 58, 97, 93]


def _prefill_logits(model, ids):
    runner = PagedForward(model)
    kv = KVCache.zeros(runner.config, num_pages=2, page_size=8)
    logits, _ = runner.forward(jnp.asarray([ids]), jnp.arange(len(ids))[None], kv,
                               jnp.asarray([[0, 1]], jnp.int32), jnp.ones((1, len(ids)), bool),
                               all_positions=True)
    return np.asarray(logits[0])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_model("llama", folder)
    return folder, model


def test_sharded_index_loads_like_single_file(tmp_path, tiny_folder):
    single, hf_model = tiny_folder
    sharded = tmp_path / "sharded"
    save_tiny_model("llama", sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    _, model = load_decoder(sharded)
    np.testing.assert_allclose(_prefill_logits(model, PROMPT), hf_logits(hf_model, PROMPT),
                               atol=1e-4, rtol=0)


def test_bfloat16_weights_load(tmp_path):
    hf_model = save_tiny_model("llama", tmp_path)
    hf_bf16 = hf_model.to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path)
    _, model = load_decoder(tmp_path)  # upcast to float32 on load
    reference = hf_logits(hf_bf16.float(), PROMPT)
    np.testing.assert_allclose(_prefill_logits(model, PROMPT), reference, atol=1e-4, rtol=0)


def _copy(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder[0], folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _assert_one_line_error(fn, *fragments):
    with pytest.raises(CheckpointError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path(tmp_path):
    _assert_one_line_error(lambda: load_model(tmp_path / "nothing-here"), "no such file or folder")


def test_missing_config(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "config.json").unlink()
    _assert_one_line_error(lambda: load_model(folder), "no config.json")


def test_missing_weights(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    _assert_one_line_error(lambda: load_model(folder), "model.safetensors")


def test_missing_shard(tmp_path):
    save_tiny_model("llama", tmp_path, max_shard_size="100KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    _assert_one_line_error(lambda: load_model(tmp_path), "shard", "missing")


def test_unknown_architecture(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    _edit_config(folder, model_type="gpt2")
    _assert_one_line_error(lambda: load_model(folder), "unknown architecture", "gpt2")


def test_unsupported_rope_scaling(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    _assert_one_line_error(lambda: load_model(folder), "rope scaling", "yarn")


def test_truncated_safetensors(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(lambda: load_model(folder), "model.safetensors")


def test_tensor_of_wrong_shape(tmp_path, tiny_folder):
    folder = _copy(tiny_folder, tmp_path)
    _edit_config(folder, intermediate_size=96)
    _assert_one_line_error(lambda: load_model(folder), "mlp.gate_proj.weight", "shape")
