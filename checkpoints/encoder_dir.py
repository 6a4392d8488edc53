"""BERT-family encoders from an HF folder, with sentence-transformers' pooling.

The folder holds `config.json`, `model.safetensors` (or a sharded index)
and the tokenizer files; a sentence-transformers folder adds `modules.json`
(which modules run after the encoder: Pooling, Normalize),
`1_Pooling/config.json` (the pooling mode) and `sentence_bert_config.json`
(the longest input, in tokens).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from checkpoints.decoder_params import assign_value
from checkpoints.errors import CheckpointError
from checkpoints.safetensors_dir import read_config, tensor_files
from checkpoints.tokenizer import Tokenizer
from model.bert import BertEncoder, EncoderConfig, encoder_weight_shapes
from model.config import ConfigError
from model.pooling import PoolingConfig, PoolingMode

# Our stacked layer weight → (HF name inside `encoder.layer.{i}.`, is a matrix).
_LAYER_SOURCES = {
    "q_proj": ("attention.self.query.weight", True), "q_bias": ("attention.self.query.bias", False),
    "k_proj": ("attention.self.key.weight", True), "k_bias": ("attention.self.key.bias", False),
    "v_proj": ("attention.self.value.weight", True), "v_bias": ("attention.self.value.bias", False),
    "o_proj": ("attention.output.dense.weight", True), "o_bias": ("attention.output.dense.bias", False),
    "attention_norm": ("attention.output.LayerNorm.weight", False),
    "attention_norm_bias": ("attention.output.LayerNorm.bias", False),
    "up_proj": ("intermediate.dense.weight", True), "up_bias": ("intermediate.dense.bias", False),
    "down_proj": ("output.dense.weight", True), "down_bias": ("output.dense.bias", False),
    "output_norm": ("output.LayerNorm.weight", False), "output_norm_bias": ("output.LayerNorm.bias", False),
}
_EMBEDDING_SOURCES = {
    "word_embeddings": "embeddings.word_embeddings.weight",
    "position_embeddings": "embeddings.position_embeddings.weight",
    "token_type_embeddings": "embeddings.token_type_embeddings.weight",
    "embedding_norm": "embeddings.LayerNorm.weight",
    "embedding_norm_bias": "embeddings.LayerNorm.bias",
}
_POOLING_MODES = {"pooling_mode_mean_tokens": PoolingMode.MEAN, "pooling_mode_cls_token": PoolingMode.CLS,
                  "pooling_mode_max_tokens": PoolingMode.MAX, "pooling_mode_lasttoken": PoolingMode.LAST}


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedEncoder:
    path: Path
    config: EncoderConfig
    model: BertEncoder
    tokenizer: Tokenizer
    pooling: PoolingConfig
    max_length: int  # longest input in tokens, special tokens included


def is_encoder_folder(path: Path) -> bool:
    """An HF folder whose config names a BERT encoder."""
    try:
        return path.is_dir() and json.loads((path / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError):
        return False


def load_encoder(folder: str | Path, *, dtype=jnp.float32) -> LoadedEncoder:
    folder = Path(folder)
    try:
        cfg = EncoderConfig.from_hf_dict(read_config(folder))
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    model = _build(cfg, folder, dtype)
    pooling = read_pooling(folder)
    max_length = cfg.max_position_embeddings
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = min(max_length, json.loads(st_config.read_text()).get("max_seq_length") or max_length)
    return LoadedEncoder(path=folder, config=cfg, model=model, tokenizer=Tokenizer.from_folder(folder),
                         pooling=pooling, max_length=max_length)


def read_pooling(folder: Path) -> PoolingConfig:
    """sentence-transformers' pooling and normalisation; mean pooling, unnormalised, without modules.json."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return PoolingConfig()
    try:
        modules = json.loads(modules_path.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{modules_path}: unreadable ({e})") from None
    unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise CheckpointError(f"{modules_path}: unsupported sentence-transformers modules {sorted(unknown)}")
    mode = PoolingMode.MEAN
    if "Pooling" in kinds:
        pooling_path = folder / kinds["Pooling"] / "config.json"
        try:
            settings = json.loads(pooling_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{pooling_path}: unreadable ({e})") from None
        chosen = [mode for key, mode in _POOLING_MODES.items() if settings.get(key)]
        others = [key for key, value in settings.items() if key.startswith("pooling_mode") and value
                  and key not in _POOLING_MODES]
        if len(chosen) != 1 or others:
            asked = sorted(k for k, v in settings.items() if k.startswith("pooling_mode") and v)
            raise CheckpointError(f"{pooling_path}: exactly one of mean, cls, max or last-token pooling is "
                                  f"supported, got {asked}")
        mode = chosen[0]
    return PoolingConfig(mode=mode, normalize="Normalize" in kinds)


def _build(cfg: EncoderConfig, folder: Path, dtype) -> BertEncoder:
    files = tensor_files(folder)
    # BertFor… checkpoints prefix every tensor with "bert."
    prefix = "bert." if any(name.startswith("bert.") for name in files) else ""
    handles = {path: safe_open(path, framework="flax") for path in sorted(set(files.values()))}

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = prefix + name
        if full not in files:
            raise CheckpointError(f"{folder}: missing tensor {full!r}")
        array = np.asarray(handles[files[full]].get_tensor(full))
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{folder}: tensor {full!r} has shape {tuple(array.shape)}, expected {shape}")
        return array

    model = BertEncoder(cfg, dtype=dtype)
    D = cfg.hidden_size
    embedding_shapes = {"word_embeddings": (cfg.vocab_size, D),
                        "position_embeddings": (cfg.max_position_embeddings, D),
                        "token_type_embeddings": (cfg.type_vocab_size, D), "embedding_norm": (D,),
                        "embedding_norm_bias": (D,)}
    for ours, hf_name in _EMBEDDING_SOURCES.items():
        assign_value(getattr(model, ours), jnp.asarray(fetch(hf_name, embedding_shapes[ours]), dtype))
    for ours, stacked_shape in encoder_weight_shapes(cfg).items():
        hf_suffix, is_matrix = _LAYER_SOURCES[ours]
        per_layer = stacked_shape[1:]
        layers = []
        for i in range(cfg.num_layers):
            array = fetch(f"encoder.layer.{i}.{hf_suffix}", per_layer[::-1] if is_matrix else per_layer)
            layers.append(array.T if is_matrix else array)  # HF stores [out, in]
        assign_value(getattr(model.layers, ours), jnp.asarray(np.stack(layers), dtype))
    return model


