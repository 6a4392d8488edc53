"""What a checkpoint holds, read from its headers and metadata alone (no weight is
loaded): format, architecture, parameter count, and dtypes with their sizes.
Any supported format: a GGUF file, an HF safetensors folder, a converted
(Orbax) checkpoint folder. `balansis inspect PATH` prints it.
"""

from __future__ import annotations

import math
from pathlib import Path

from checkpoints import gguf_file, orbax_dir, safetensors_dir
from checkpoints.errors import CheckpointError
from model.config import ConfigError, DecoderConfig


def describe(path: Path) -> dict:
    """{"path", "format", "config", "parameters", "tensors": [{name, shape, dtype, bytes}], "bytes_on_disk"}."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if orbax_dir.is_orbax_dir(path):
        manifest = orbax_dir.read_manifest(path)
        config = orbax_dir.read_config(path)
        tensors = [_tensor(name, leaf.shape, str(leaf.dtype), None)
                   for name, leaf in orbax_dir.parameter_metadata(path).items()]
        kind = f"Orbax ({orbax_dir.FORMAT} v{manifest['version']}, from {manifest.get('source')})"
    elif path.is_dir():
        try:
            config = DecoderConfig.from_hf_dict(safetensors_dir.read_config(path))
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        tensors = _safetensors_tensors(path)
        kind = "HF safetensors"
    elif gguf_file.is_gguf_file(path):
        reader = gguf_file.open_gguf(path)
        config = gguf_file.config_from_gguf(reader, path)
        # GGUF lists dimensions innermost first; HF order is the reverse.
        tensors = [_tensor(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))
                   for t in reader.tensors]
        kind = "GGUF"
    else:
        raise CheckpointError(f"{path}: not a model: expected a GGUF file, a folder with config.json "
                              f"and safetensors, or a converted (Orbax) checkpoint folder")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"path": str(path), "format": kind, "config": config.to_hf_dict(),
            "parameters": sum(t["elements"] for t in tensors), "tensors": tensors,
            "bytes_on_disk": sum(p.stat().st_size for p in files)}


def _tensor(name: str, shape, dtype: str, nbytes: int | None) -> dict:
    elements = math.prod(shape)
    if nbytes is None:
        nbytes = elements * _itemsize(dtype)
    return {"name": name, "shape": list(shape), "dtype": dtype, "elements": elements, "bytes": nbytes}


def _itemsize(dtype: str) -> int:
    import jax.numpy as jnp  # knows bfloat16

    return jnp.dtype(dtype.lower().replace("bf16", "bfloat16")).itemsize


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_tensors(folder: Path) -> list[dict]:
    import json
    import struct

    tensors = []
    for file in sorted(set(safetensors_dir.tensor_files(folder).values())):
        try:  # the header alone: 8 bytes of length, then JSON
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensors.append(_tensor(name, info["shape"], _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]),
                                   end - begin))
    return tensors


def format_description(d: dict) -> str:
    c = d["config"]
    arch = (f"{c['model_type']}: {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"intermediate {c['intermediate_size']}, {c['num_attention_heads']} heads / "
            f"{c['num_key_value_heads']} KV heads × {c['head_dim']}, vocabulary {c['vocab_size']}, "
            f"context {c['max_position_embeddings']}"
            + (", tied embeddings" if c["tie_word_embeddings"] else ""))
    by_dtype: dict[str, list[int]] = {}
    for t in d["tensors"]:
        count = by_dtype.setdefault(t["dtype"], [0, 0, 0])
        count[0] += 1
        count[1] += t["elements"]
        count[2] += t["bytes"]
    lines = [f"path:          {d['path']}", f"format:        {d['format']}", f"architecture:  {arch}",
             f"parameters:    {d['parameters']:,} in {len(d['tensors'])} tensors",
             f"on disk:       {_size(d['bytes_on_disk'])}", "dtypes:"]
    for dtype, (tensors, elements, nbytes) in sorted(by_dtype.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {dtype:<10} {tensors:>5} tensors  {elements:>15,} parameters  {_size(nbytes):>10}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
