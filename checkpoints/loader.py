"""One entry point for every supported checkpoint: `load_model(path)`.

The format is read from the content — a folder with `config.json` is an HF
safetensors checkpoint, a file starting with the GGUF magic is GGUF — never
guessed from a file name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from checkpoints import gguf_file, orbax_dir, safetensors_dir
from checkpoints.default_model import DEFAULT_MODEL_NAME, default_model_path
from checkpoints.errors import CheckpointError
from checkpoints.tokenizer import Tokenizer
from model.config import DecoderConfig
from model.llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    path: Path
    config: DecoderConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer


def load_model(path: str | Path | None = None, *, dtype=None, mesh=None) -> LoadedModel:
    """Load weights and tokenizer from `path` (the default model when None), each weight
    placed on its sharding over `mesh` (model.sharding; one device when None).

    `dtype`: of the weights; None keeps an Orbax checkpoint's own and gives float32 otherwise.
    Raises CheckpointError, with a one-line message, for anything unusable.
    """
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if orbax_dir.is_orbax_dir(path):
        config, model = orbax_dir.load_decoder(path, mesh=mesh)
        if dtype is not None:
            for _, variable in nnx.iter_graph(model):
                if isinstance(variable, nnx.Param) and variable[...].dtype != dtype:
                    variable.set_value(variable[...].astype(dtype))
        tokenizer = Tokenizer.from_folder(path)
    elif path.is_dir():
        config, model = safetensors_dir.load_decoder(path, dtype=dtype or jnp.float32, mesh=mesh)
        tokenizer = Tokenizer.from_folder(path)
    elif gguf_file.is_gguf_file(path):
        reader = gguf_file.open_gguf(path)  # parsed once (~2.7 s for the default model) for both
        config, model = gguf_file.load_decoder(path, dtype=dtype or jnp.float32, mesh=mesh, reader=reader)
        tokenizer = Tokenizer.from_gguf(path, reader=reader)
    else:
        raise CheckpointError(
            f"{path}: not a model: expected a GGUF file, a folder with config.json and safetensors, "
            f"or a converted (Orbax) checkpoint folder")
    return LoadedModel(path=path, config=config, model=model, tokenizer=tokenizer)


def model_name(loaded: LoadedModel) -> str:
    """The name a model is served under by default."""
    return model_name_for(loaded.path)


def model_name_for(path: str | Path | None) -> str:
    """The default model's own name for it (or None), else the file or folder name."""
    path = default_model_path_or_none() if path is None else Path(path)
    if path is not None and path == default_model_path_or_none():
        return DEFAULT_MODEL_NAME
    return Path(path).name if path is not None else DEFAULT_MODEL_NAME


def default_model_path_or_none() -> Path | None:
    try:
        return default_model_path()
    except CheckpointError:
        return None
