"""HF-named tensors → the stacked weights of `model.llama.LlamaForCausalLM`.

Every loader (safetensors, GGUF) first presents its tensors under HF
transformers' Llama names (`model.layers.3.self_attn.q_proj.weight`, …),
with HF's `[out, in]` matrix layout; this module checks every shape,
transposes matrices to `[in, out]`, stacks layers and builds the module.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints.errors import CheckpointError
from model import sharding
from model.config import DecoderConfig
from model.llama import LlamaForCausalLM, layer_weight_shapes

# Our stacked layer weight → (HF name inside `model.layers.{i}.`, is a matrix).
_LAYER_SOURCES = {
    "input_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "post_attention_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}

# Reads one tensor by HF name, as a numpy array in HF layout.
TensorReader = Callable[[str], np.ndarray]


def build_decoder(cfg: DecoderConfig, names: Iterable[str], read: TensorReader, *,
                  source: str, dtype=jnp.float32, mesh=None) -> LlamaForCausalLM:
    """Build the model from HF-named tensors; `source` names the file in errors.

    Each weight goes from the host straight onto its sharding over `mesh`
    (model.sharding; one device when None), so no device holds more than its share.
    """
    available = set(names)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    sharding.check_shardable(cfg, mesh)

    def place(array: np.ndarray, path: str) -> jax.Array:
        return jax.device_put(np.asarray(array, dtype=dtype), sharding.param_sharding(path, cfg, mesh))

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in available:
            raise CheckpointError(f"{source}: missing tensor {name!r}")
        array = read(name)
        if tuple(array.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
        return array

    weights: dict[str, jax.Array] = {}
    for ours, stacked_shape in layer_weight_shapes(cfg).items():
        hf_suffix, is_matrix = _LAYER_SOURCES[ours]
        per_layer = stacked_shape[1:]
        hf_shape = per_layer[::-1] if is_matrix else per_layer
        layers = []
        for i in range(cfg.num_layers):
            array = fetch(f"model.layers.{i}.{hf_suffix}", hf_shape)
            layers.append(array.T if is_matrix else array)
        weights[ours] = place(np.stack(layers), f"layers.{ours}")

    D, V = cfg.hidden_size, cfg.vocab_size
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, value in weights.items():
        assign_value(getattr(model.layers, name), value)
    assign_value(model.embed_tokens, place(fetch("model.embed_tokens.weight", (V, D)), "embed_tokens"))
    assign_value(model.final_norm, place(fetch("model.norm.weight", (D,)), "final_norm"))
    if not cfg.tie_word_embeddings:
        assign_value(model.lm_head, place(fetch("lm_head.weight", (V, D)).T, "lm_head"))
    return model


def assign_value(variable: nnx.Variable, value: jax.Array) -> None:
    # flax >= 0.12 deprecates the `.value` setter in favour of `set_value`.
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value
