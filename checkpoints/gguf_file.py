"""GGUF files (llama.cpp's format): metadata → `DecoderConfig`, tensors →
dequantised float32 under HF names, then `build_decoder`.

llama.cpp's converter stores the Q and K projections of Llama-architecture
models with each head's rows interleaved for its rotary layout; we undo that
permutation as HF transformers' GGUF loader does, so RoPE here stays in the
half-split layout of `model/rope.py`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from checkpoints.decoder_params import build_decoder
from checkpoints.errors import CheckpointError
from model.config import ConfigError, DecoderConfig, RopeScaling, RopeType
from model.llama import LlamaForCausalLM

GGUF_MAGIC = b"GGUF"

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K})

# GGUF architecture name → HF model_type. Which of them carry permuted Q/K.
_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_PERMUTED_QK = {"llama", "mistral"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def is_gguf_file(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes (content, not name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/… on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or damaged ({e})") from None


def metadata(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str | None:
    """HF transformers name of a GGUF tensor, or None for one we do not use."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> DecoderConfig:
    arch = metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r}; supported: "
                              f"{', '.join(_ARCHITECTURES)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(f"{path}: per-frequency RoPE factors (rope_freqs.weight) are not supported")

    def key(name, default=None):
        return metadata(reader, f"{arch}.{name}", default)

    def first_present(*names):
        # An explicit 0 is kept (and rejected by DecoderConfig), not skipped.
        return next((key(n) for n in names if key(n) is not None), None)

    try:
        num_heads = int(key("attention.head_count"))
        hidden_size = int(key("embedding_length"))
        if num_heads <= 0:
            raise ConfigError(f"attention.head_count must be positive, got {num_heads}")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab_size = key("vocab_size")
        if vocab_size is None:
            vocab_size = len(tokens.data) if tokens else int(embed.shape[1]) if embed is not None else None
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type in ("none", None):
            rope_scaling = RopeScaling()
        elif scaling_type == "linear":
            rope_scaling = RopeScaling(RopeType.LINEAR, factor=float(key("rope.scaling.factor")))
        else:
            raise ConfigError(f"unsupported rope scaling type {scaling_type!r}")
        head_dim = first_present("attention.key_length", "rope.dimension_count")
        return DecoderConfig(
            model_type=_ARCHITECTURES[arch],
            vocab_size=int(vocab_size),
            hidden_size=hidden_size,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=int(head_dim if head_dim is not None else hidden_size // num_heads),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            has_qkv_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
            sliding_window=key("attention.sliding_window"),
        )
    except ConfigError as e:  # before ValueError: ConfigError is one
        raise CheckpointError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete {arch} metadata ({e})") from None


def _unpermute(w_oi: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows (inverse of its `permute`)."""
    out_dim = w_oi.shape[0]
    return (w_oi.reshape(num_heads, out_dim // num_heads // 2, 2, *w_oi.shape[1:])
            .swapaxes(1, 2).reshape(w_oi.shape))


def load_decoder(path: Path, *, dtype=jnp.float32, mesh=None,
                 reader: gguf.GGUFReader | None = None) -> tuple[DecoderConfig, LlamaForCausalLM]:
    """The decoder in the GGUF file at `path`, read through `reader` when the file is open already."""
    reader = reader or open_gguf(path)
    cfg = config_from_gguf(reader, path)
    tensors = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} uses quantisation type {tensor.tensor_type.name}, "
                f"not supported (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        tensors[name] = tensor
    arch = metadata(reader, "general.architecture")

    def read(name: str) -> np.ndarray:
        tensor = tensors[name]
        try:
            w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantise tensor {tensor.name!r} ({e})") from None
        w = np.asarray(w, dtype=np.float32)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            num_heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            # A tensor of the wrong shape is left as it is for build_decoder's
            # shape check, which names it.
            if w.shape == (num_heads * cfg.head_dim, cfg.hidden_size):
                w = _unpermute(w, num_heads)
        return w

    return cfg, build_decoder(cfg, tensors.keys(), read, source=str(path), dtype=dtype, mesh=mesh)
