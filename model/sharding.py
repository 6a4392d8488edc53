"""How a decoder's weights and KV cache lie on a device mesh.

The mesh has two named axes: `data` (replicas of the weights, each running
its share of the batch) and `model` (tensor parallelism, Megatron-style:
Shoeybi et al., 2019). Every parameter names its dimensions with logical
axes (`PARAM_AXES`); one rules table (`RULES`) maps logical axes to mesh
axes. So q/k/v/gate/up are split by output columns (column-parallel),
o/down by input rows (row-parallel, XLA adds the all-reduce), and the
embedding and LM head by vocabulary. Activations follow by XLA's sharding
propagation (GSPMD).

KV heads: the cache is split over KV heads when the tensor-parallel size
divides their number. With fewer KV heads than tensor-parallel shards
(GQA with few KV heads), k/v projections and the cache are replicated over
`model` instead, costing (tp / kv_heads)× their memory. Any other shape that
does not divide is refused before a weight is placed (`check_shardable`).

The same code runs on one device: a 1 × 1 mesh shards nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import DecoderConfig

DATA, MODEL = "data", "model"

# Logical axis → mesh axis (None: replicated). `kv_heads` is decided per model
# (see kv_heads_axis).
RULES: dict[str, str | None] = {
    "layers": None, "embed": None, "heads": MODEL, "mlp": MODEL, "vocab": MODEL,
    "batch": DATA, "pages": None, "page_slots": None, "head_dim": None,
}

# Every parameter's logical axes, by its path in the model (see model.llama).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers.input_norm": ("layers", "embed"),
    "layers.post_attention_norm": ("layers", "embed"),
    "layers.q_proj": ("layers", "embed", "heads"),
    "layers.k_proj": ("layers", "embed", "kv_heads"),
    "layers.v_proj": ("layers", "embed", "kv_heads"),
    "layers.o_proj": ("layers", "heads", "embed"),
    "layers.q_bias": ("layers", "heads"),
    "layers.k_bias": ("layers", "kv_heads"),
    "layers.v_bias": ("layers", "kv_heads"),
    "layers.gate_proj": ("layers", "embed", "mlp"),
    "layers.up_proj": ("layers", "embed", "mlp"),
    "layers.down_proj": ("layers", "mlp", "embed"),
}
# Int8 quantisation's scales (model.quantization): one per output column, split as the columns.
PARAM_AXES.update({
    "embed_tokens_scale": ("vocab",), "lm_head_scale": ("vocab",),
    "layers.q_proj_scale": ("layers", "heads"), "layers.k_proj_scale": ("layers", "kv_heads"),
    "layers.v_proj_scale": ("layers", "kv_heads"), "layers.o_proj_scale": ("layers", "embed"),
    "layers.gate_proj_scale": ("layers", "mlp"), "layers.up_proj_scale": ("layers", "mlp"),
    "layers.down_proj_scale": ("layers", "embed"),
})

# The KV cache [layers, kv_heads, pages, page_slots, head_dim] (model.kv_cache).
KV_CACHE_AXES = ("layers", "kv_heads", "pages", "page_slots", "head_dim")


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: list | None = None) -> Mesh:
    """A `data` × `model` mesh over the first dp × tp devices (all processes' devices)."""
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError("tensor- and data-parallel sizes must be at least 1")
    devices = jax.devices() if devices is None else devices
    needed = tensor_parallel_size * data_parallel_size
    if needed > len(devices):
        raise ValueError(f"tensor-parallel size {tensor_parallel_size} × data-parallel size "
                         f"{data_parallel_size} needs {needed} devices; {len(devices)} are visible")
    grid = np.asarray(devices[:needed], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DATA, MODEL))


def tensor_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[MODEL]


def kv_heads_axis(cfg: DecoderConfig, mesh: Mesh) -> str | None:
    """`model` when the KV heads split evenly over it, else None (replicated)."""
    tp = tensor_parallel_size(mesh)
    return MODEL if cfg.num_kv_heads % tp == 0 else None


def check_shardable(cfg: DecoderConfig, mesh: Mesh) -> None:
    """Raise ValueError, naming the dimension, when the model cannot be split over `mesh`."""
    tp = tensor_parallel_size(mesh)
    if tp == 1:
        return
    for name, size in (("attention heads", cfg.num_heads), ("intermediate size", cfg.intermediate_size),
                       ("vocabulary size", cfg.vocab_size)):
        if size % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide the model's {name} ({size})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"tensor-parallel size {tp} and the model's {cfg.num_kv_heads} KV heads: one "
                         f"must divide the other (KV heads are split, or replicated when fewer)")


def partition_spec(axes: tuple[str, ...], cfg: DecoderConfig, mesh: Mesh) -> PartitionSpec:
    rules = {**RULES, "kv_heads": kv_heads_axis(cfg, mesh)}
    return PartitionSpec(*(rules[a] for a in axes))


def param_sharding(path: str, cfg: DecoderConfig, mesh: Mesh) -> NamedSharding:
    """The sharding of the parameter at `path` ("layers.q_proj", "embed_tokens", …)."""
    return NamedSharding(mesh, partition_spec(PARAM_AXES[path], cfg, mesh))


def kv_cache_sharding(cfg: DecoderConfig, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(KV_CACHE_AXES, cfg, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_model(model, mesh: Mesh) -> None:
    """Move every parameter of a `LlamaForCausalLM` onto its sharding over `mesh`, in place.

    A parameter already there is left alone (no copy).
    """
    from flax import nnx

    cfg = model.config
    check_shardable(cfg, mesh)
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        name = ".".join(str(p) for p in path)
        sharding = param_sharding(name, cfg, mesh)
        value = variable[...]
        if not value.sharding.is_equivalent_to(sharding, value.ndim):
            variable.set_value(jax.device_put(value, sharding))

