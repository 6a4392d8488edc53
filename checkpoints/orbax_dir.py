"""Our own checkpoint folder: the weights as an Orbax checkpoint, with the
config, tokenizer and chat template alongside.

    DST/
      balansis-checkpoint.json   what this is: format version, dtype, source (written last)
      config.json                HF-style (model.config.DecoderConfig.to_hf_dict)
      tokenizer.json, tokenizer_config.json, …   the tokenizer and its chat template
      params/                    Orbax (StandardCheckpointer) of the model's parameters

Writing goes to a hidden sibling folder that is renamed to DST only once
everything is on disk, so an interrupted conversion never leaves a folder
at DST, and the partial one has no manifest, which is what loading checks.
Loading restores each parameter straight onto its sharding over the mesh
(model.sharding): every device reads only its own shard from disk.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.errors import CheckpointError
from model import sharding
from model.config import ConfigError, DecoderConfig
from model.llama import LlamaForCausalLM

MANIFEST = "balansis-checkpoint.json"
FORMAT = "balansis-orbax"
VERSION = 1
PARAMS = "params"
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def is_orbax_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def save(model: LlamaForCausalLM, tokenizer, destination: Path, *, source: str, overwrite: bool = False) -> None:
    """Write `model` (in its own dtype) and `tokenizer` as a checkpoint folder at `destination`."""
    import orbax.checkpoint as ocp

    destination = destination.absolute()
    if destination.exists() and not overwrite:
        raise CheckpointError(f"{destination}: already exists (pass --overwrite to replace it)")
    if not destination.parent.is_dir():
        raise CheckpointError(f"{destination.parent}: no such folder")
    partial = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir()
        (partial / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        tokenizer.save(partial)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(partial / PARAMS, params)
        checkpointer.wait_until_finished()
        dtypes = sorted({str(a.dtype) for a in jax.tree.leaves(params)})
        manifest = {"format": FORMAT, "version": VERSION, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
                    "source": source}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if destination.exists():  # --overwrite: the old folder goes only once the new one is whole
            stale = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
            destination.rename(stale)
            partial.rename(destination)
            shutil.rmtree(stale)
        else:
            partial.rename(destination)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} v{VERSION} checkpoint ({manifest.get('format')!r} "
                              f"v{manifest.get('version')!r})")
    return manifest


def read_config(path: Path) -> DecoderConfig:
    try:
        return DecoderConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        message = str(e) if isinstance(e, ConfigError) else f"unreadable config.json ({e})"
        raise CheckpointError(f"{path}: {message}") from None


def parameter_metadata(path: Path) -> dict:
    """Shape and dtype of every stored parameter, by path, without reading a weight."""
    import orbax.checkpoint as ocp

    try:
        tree = ocp.StandardCheckpointer().metadata(path.absolute() / PARAMS).item_metadata
    except Exception as e:  # Orbax raises many types; name the folder
        raise CheckpointError(f"{path / PARAMS}: not a readable Orbax checkpoint ({e})") from None
    return {".".join(str(k.key) for k in keys): leaf
            for keys, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}


def load_decoder(path: Path, *, mesh=None) -> tuple[DecoderConfig, LlamaForCausalLM]:
    """The model, each parameter restored onto its sharding over `mesh` (one device when None)."""
    import orbax.checkpoint as ocp

    read_manifest(path)
    cfg = read_config(path)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    sharding.check_shardable(cfg, mesh)
    stored = parameter_metadata(path)
    dtype = {leaf.dtype for leaf in stored.values()}
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype.pop() if len(dtype) == 1 else jnp.float32,
                                                    rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    expected = nnx.to_pure_dict(abstract)
    target = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        name = ".".join(str(k.key) for k in keys)
        if name not in stored:
            raise CheckpointError(f"{path}: missing parameter {name!r}")
        if tuple(stored[name].shape) != tuple(leaf.shape):
            raise CheckpointError(f"{path}: parameter {name!r} has shape {tuple(stored[name].shape)}, "
                                  f"expected {tuple(leaf.shape)}")
        _set(target, [str(k.key) for k in keys], jax.ShapeDtypeStruct(
            leaf.shape, stored[name].dtype, sharding=sharding.param_sharding(name, cfg, mesh)))
    try:
        restored = ocp.StandardCheckpointer().restore(path.absolute() / PARAMS, target)
    except Exception as e:
        raise CheckpointError(f"{path / PARAMS}: cannot restore ({e})") from None
    nnx.replace_by_pure_dict(abstract, restored)
    return cfg, nnx.merge(graphdef, abstract)


def _set(tree: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
