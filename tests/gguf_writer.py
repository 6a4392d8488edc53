"""Tiny Llama-architecture GGUF files for tests, written the way llama.cpp's
`convert_hf_to_gguf.py` writes them: its metadata keys and tensor names, Q/K
rows permuted per head, norms in F32 and matrices in a chosen ggml type.

gguf-py can quantise F32/F16/BF16/Q8_0/Q4_0/Q4_1 itself. For other types
(the K-quants Q4_K/Q5_K/Q6_K, or e.g. Q2_K for error tests) it cannot, so
those matrices are random blocks of the right size whose float16 scale fields
are overwritten with small values: valid, finite weights of the right type,
unrelated to the state dict's (tests compare against HF loading the same file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import gguf
import numpy as np
import torch
import transformers

Q = gguf.GGMLQuantizationType

# Types gguf-py can quantise from float data.
QUANTIZABLE = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1})

# For the types written as random blocks: (byte offset of an f16 field, value).
# Chosen so dequantised weights are roughly zero-centred with std ~0.03.
_RANDOM_BLOCK_SCALES = {
    Q.Q4_K: ((0, 1e-4), (2, 7.5e-4)),  # d, dmin; then 12 scale bytes, 128 nibbles
    Q.Q5_K: ((0, 5e-5), (2, 7.5e-4)),  # d, dmin; scales, qh[32], qs[128]
    Q.Q6_K: ((208, 2e-5),),  # ql[128], qh[64], int8 scales[16], d
    Q.Q2_K: ((80, 2e-3), (82, 2e-3)),  # scales[16], qs[64], d, dmin
    Q.Q3_K: ((108, 2e-4),),  # hmask[32], qs[64], scales[12], d
}

# `general.file_type` as llama.cpp sets it (the "mostly" type of a file).
_FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K, Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# Dimensions that suit every block size, K-quants' 256 included.
TINY_GGUF = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of Q/K rows (HF half-split → interleaved rotary)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, 2, out_dim // n_head // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF Llama tensor."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    prefix, layer, suffix = hf_name.split(".", 3)[1:]
    assert prefix == "layers", hf_name
    return f"blk.{layer}.{_LAYER_NAMES[suffix]}"


def random_blocks(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for a `[rows, cols]` matrix of `qtype`, scale fields made small and finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    if cols % block_size:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size}, got {cols}")
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset, value in _RANDOM_BLOCK_SCALES.get(qtype, ()):
        # A little spread per block, so blocks differ in scale too.
        scales = (value * rng.uniform(0.5, 1.5, size=blocks.shape[0])).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def encode_matrix(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """A `[out, in]` float matrix as the array to hand to `GGUFWriter.add_tensor(raw_dtype=qtype)`."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(w, qtype)
    return random_blocks(w.shape, qtype, rng)


def write_gguf(path: Path, state_dict: Mapping[str, np.ndarray], config: transformers.PretrainedConfig,
               *, tensor_type: Q = Q.F32, architecture: str = "llama", name: str = "tiny-llama",
               type_overrides: Mapping[str, Q] | None = None,
               metadata_overrides: Mapping[str, object] | None = None, seed: int = 0,
               check_finite: bool = True) -> Path:
    """Write an HF Llama `state_dict` (name → `[out, in]` float array) as a GGUF file.

    Norms (1-D) are always F32; matrices use `tensor_type`, or the type that
    `type_overrides` gives for their GGUF name. `lm_head.weight` is omitted when
    the config ties embeddings. `architecture` names the metadata prefix too,
    as llama.cpp does (`{architecture}.block_count`, …). `metadata_overrides`
    replaces (or, with None, drops) keys under that prefix: `{"attention.head_count": 3}`.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    type_overrides = dict(type_overrides or {})
    n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5; 4.x: config.rope_theta
    keys: dict[str, object] = {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_kv_head,
        "rope.freq_base": float(rope.get("rope_theta") or config.rope_theta),
        "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
        "rope.dimension_count": head_dim,
    }
    keys.update(metadata_overrides or {})

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name)
    for key, value in keys.items():
        if value is None:  # an override of None leaves the key out
            continue
        if isinstance(value, str):
            writer.add_string(f"{architecture}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{architecture}.{key}", value)
        else:
            writer.add_uint32(f"{architecture}.{key}", int(value))
    writer.add_file_type(_FILE_TYPES.get(tensor_type, gguf.LlamaFileType.GUESSED))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, value in state_dict.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in hf_name:
            continue
        w = np.asarray(value, dtype=np.float32)
        name_out = gguf_name(hf_name)
        if name_out.endswith("attn_q.weight"):
            w = permute(w, n_head)
        elif name_out.endswith("attn_k.weight"):
            w = permute(w, n_kv_head)
        if w.ndim == 1:
            writer.add_tensor(name_out, np.ascontiguousarray(w))
            continue
        qtype = type_overrides.get(name_out, tensor_type)
        data = encode_matrix(w, qtype, rng)
        if check_finite and qtype in _RANDOM_BLOCK_SCALES:
            assert np.isfinite(gguf.quants.dequantize(data, qtype)).all(), (name_out, qtype.name)
        writer.add_tensor(name_out, data, raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(*, seed: int = 0, **overrides) -> torch.nn.Module:
    """Random-weight HF Llama with `TINY_GGUF` dimensions (norms perturbed away from 1)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_GGUF, **overrides})
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_tiny_llama_gguf(path: Path, *, tensor_type: Q = Q.F32, seed: int = 0,
                          architecture: str = "llama", type_overrides: Mapping[str, Q] | None = None,
                          metadata_overrides: Mapping[str, object] | None = None,
                          **overrides) -> Path:
    """A tiny random Llama written straight to a GGUF file at `path`."""
    model = tiny_llama(seed=seed, **overrides)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return write_gguf(path, state, model.config, tensor_type=tensor_type, architecture=architecture,
                      type_overrides=type_overrides, metadata_overrides=metadata_overrides, seed=seed)


def load_hf_from_gguf(path: Path) -> torch.nn.Module:
    """HF transformers' own GGUF loader on `path` (float32, eval, offline)."""
    path = Path(path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
