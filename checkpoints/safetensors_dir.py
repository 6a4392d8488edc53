"""HF model folders: `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json` with its shards."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from checkpoints.decoder_params import build_decoder
from checkpoints.errors import CheckpointError
from model.config import ConfigError, DecoderConfig
from model.llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' numpy reader cannot represent bfloat16; its flax reader can
# (via ml_dtypes), and np.asarray of a CPU jax array is a cheap host copy.
_FRAMEWORK = "flax"


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json in the model folder")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def tensor_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index_path}: shard {shard.name} is missing")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return {name: single for name in _names_in(single)}


def _names_in(path: Path) -> list[str]:
    try:
        with safe_open(path, framework=_FRAMEWORK) as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types; name the file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_decoder(folder: Path, *, dtype=jnp.float32, mesh=None) -> tuple[DecoderConfig, LlamaForCausalLM]:
    try:
        cfg = DecoderConfig.from_hf_dict(read_config(folder))
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    files = tensor_files(folder)
    # Shards stay open for the whole load; each tensor is read once.
    handles = {}
    try:
        for path in sorted(set(files.values())):
            try:
                handles[path] = safe_open(path, framework=_FRAMEWORK)
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

        def read(name: str) -> np.ndarray:
            try:
                return np.asarray(handles[files[name]].get_tensor(name))
            except Exception as e:
                raise CheckpointError(f"{files[name]}: cannot read tensor {name!r} ({e})") from None

        return cfg, build_decoder(cfg, files.keys(), read, source=str(folder), dtype=dtype, mesh=mesh)
    finally:
        handles.clear()
