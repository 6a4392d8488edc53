"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in Flax NNX.

References: Touvron et al., 2023, "Llama 2"; Jiang et al., 2023, "Mistral 7B"
(sliding-window attention); the Qwen2 technical report (QKV bias); HF
transformers' `modeling_llama.py` is the numerical reference in tests.

Layers are stored stacked (a leading `num_layers` axis on every layer
weight) and run with one `jax.lax.scan`, so XLA compiles one layer body
instead of `num_layers` copies. The KV cache rides in the scan carry and is
updated with scatters, which XLA performs in place on a donated buffer.

One call handles prefill chunks and decode steps alike: a batch of B
sequences with T new tokens each (T = 1 for decode), padded where needed and
marked by `is_valid_bt`.

`precision` (a `numerics.Precision`, static under jit) picks the
arithmetic: STANDARD computes in the weights' dtype with plain reductions;
HIGH in float32 with compensated reductions; ULTRA adds error-free matmuls
(see numerics.matmul). Under HIGH and ULTRA every reduction's order is
fixed by its own axis, and under ULTRA every matmul is exact before its
one rounding, which is what makes a row's result independent of its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention, numerics
from model import quantization as q8
from model.attention import AttentionBackend
from model.config import DecoderConfig
from model.kv_cache import KVCache, write_layer, write_slots
from model.numerics import Precision
from model.quantization import Int8Weight, Quantization
from model.rope import apply_rope, inverse_frequencies

# Names of the stacked per-layer weights, in the order the scan body reads them.
# Matrices are stored [in, out] so activations multiply on the left.
LAYER_WEIGHTS = (
    "input_norm",          # [L, D]
    "q_proj",              # [L, D, N*H]
    "k_proj",              # [L, D, K*H]
    "v_proj",              # [L, D, K*H]
    "o_proj",              # [L, N*H, D]
    "post_attention_norm", # [L, D]
    "gate_proj",           # [L, D, F]
    "up_proj",             # [L, D, F]
    "down_proj",           # [L, F, D]
)
QKV_BIASES = ("q_bias", "k_bias", "v_bias")  # [L, N*H], [L, K*H], [L, K*H]
# The matrices; under int8 quantisation each is int8 with a float32 `{name}_scale` per output
# column ([L, out]; the embedding's and LM head's: [V]).
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale"


def layer_weight_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every stacked layer weight this config needs."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {
        "input_norm": (L, D), "q_proj": (L, D, q_dim), "k_proj": (L, D, kv_dim),
        "v_proj": (L, D, kv_dim), "o_proj": (L, q_dim, D), "post_attention_norm": (L, D),
        "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D),
    }
    if cfg.has_qkv_bias:
        shapes.update(q_bias=(L, q_dim), k_bias=(L, kv_dim), v_bias=(L, kv_dim))
    return shapes


def rms_norm(x_btd, weight_d: jax.Array, eps: float, precision: Precision = Precision.STANDARD):
    """RMSNorm (Zhang & Sennrich, 2019) in float32, cast back to the input dtype
    before the weight multiplies, as HF Llama does. HIGH stays in float32; ULTRA
    takes and returns double-words (hi, lo), its scale exact to about 2**-46."""
    if precision is Precision.ULTRA:
        x_hi, x_lo = x_btd if isinstance(x_btd, tuple) else (x_btd, jnp.zeros_like(x_btd))
        scale_hi, scale_lo = numerics.double_word_rms_scale(x_hi, x_lo, eps)
        normed, normed_error = numerics.two_product(x_hi, scale_hi)
        normed_error = normed_error + x_hi * scale_lo + x_lo * scale_hi
        weight_d = weight_d.astype(jnp.float32)
        out, out_error = numerics.two_product(weight_d, normed)
        return out, out_error + weight_d * normed_error
    x = x_btd.astype(jnp.float32)
    scale = numerics.rsqrt(numerics.mean_square(x, axis=-1, precision=precision) + eps, precision=precision)
    normed = x * scale
    if precision.is_compensated:
        return weight_d.astype(jnp.float32) * normed
    return weight_d * normed.astype(x_btd.dtype)


# The residual stream: an array, or under ULTRA a double-word (hi, lo), so
# that 2 × num_layers additions do not each round it.
def _residual(x_btd: jax.Array, precision: Precision):
    return (x_btd, jnp.zeros_like(x_btd)) if precision is Precision.ULTRA else x_btd


def _value(x) -> jax.Array:
    return x[0] if isinstance(x, tuple) else x


def _add(x, delta):
    """The residual plus a layer's output (an array, or a double-word under ULTRA)."""
    if isinstance(x, tuple):
        return numerics.double_word_add(*x, *delta)
    return x + delta


def _project_out(x_btf: jax.Array, w_fd: jax.Array, precision: Precision):
    """A projection back onto the residual stream; a double-word under ULTRA."""
    if precision is Precision.ULTRA:
        return numerics.exact_matmul(x_btf, w_fd)
    return numerics.matmul(x_btf, w_fd, precision=precision)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading layer axis."""

    def __init__(self, cfg: DecoderConfig, *, dtype, quantization: Quantization, rngs: nnx.Rngs):
        for name, shape in layer_weight_shapes(cfg).items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, dtype)
            else:
                value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
            if name in MATRICES and quantization is not Quantization.NONE:
                value, scale = q8.quantize(value)
                setattr(self, name + SCALE_SUFFIX, nnx.Param(scale))
            setattr(self, name, nnx.Param(value))
        self.quantization = quantization

    def weights(self) -> dict[str, jax.Array | Int8Weight]:
        """Every stacked weight by name; a quantised matrix as an Int8Weight."""
        names = [n for n in LAYER_WEIGHTS + QKV_BIASES if hasattr(self, n)]
        return {n: _weight(self, n, self.quantization.dynamic_from_rows) for n in names}


def _weight(module: nnx.Module, name: str, dynamic_from_rows: int | None = None) -> jax.Array | Int8Weight:
    """`module.name`, with its scale as an Int8Weight when it has one."""
    value = getattr(module, name)[...]
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return value if scale is None else Int8Weight(value, scale[...], dynamic_from_rows)


class LlamaForCausalLM(nnx.Module):
    """Token ids in, final-normed hidden states out; `logits` applies the LM head."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32,
                 quantization: Quantization = Quantization.NONE, rngs: nnx.Rngs):
        self.config = cfg
        self.quantization = quantization
        embed = 0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype)
        if quantization is not Quantization.NONE:  # one scale per token: a row here, a column of the tied head
            embed, scale = q8.quantize(embed, axis=-1)
            self.embed_tokens_scale = nnx.Param(scale)  # [V]
        self.embed_tokens = nnx.Param(embed)  # [V, D]
        self.layers = DecoderLayers(cfg, dtype=dtype, quantization=quantization, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))  # [D]
        if not cfg.tie_word_embeddings:
            head = 0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype)
            if quantization is not Quantization.NONE:
                head, scale = q8.quantize(head)
                self.lm_head_scale = nnx.Param(scale)  # [V]
            self.lm_head = nnx.Param(head)  # [D, V]

    def quantized(self, quantization: Quantization) -> LlamaForCausalLM:
        """A copy of this model with its matrices, embedding and LM head quantised
        (model.quantization); itself when already so. Norms and biases are shared, not copied.
        The float weights stay as long as this model does: the caller drops it."""
        if quantization is self.quantization:
            return self
        if self.quantization is not Quantization.NONE:
            raise ValueError(f"the model is already quantised ({self.quantization.value})")
        out = nnx.eval_shape(lambda: LlamaForCausalLM(self.config, dtype=self.final_norm[...].dtype,
                                                      quantization=quantization, rngs=nnx.Rngs(0)))
        quantize = jax.jit(q8.quantize, static_argnames="axis")
        pairs = [(self, out, name) for name in ("embed_tokens", "final_norm", "lm_head")]
        pairs += [(self.layers, out.layers, name) for name in LAYER_WEIGHTS + QKV_BIASES]
        for source, target, name in pairs:
            if not hasattr(source, name):
                continue
            value = getattr(source, name)[...]
            if hasattr(target, name + SCALE_SUFFIX):
                ints, scale = quantize(value, axis=-1 if name == "embed_tokens" else -2)
                getattr(target, name + SCALE_SUFFIX).set_value(scale)
                value = ints
            getattr(target, name).set_value(value)
        return out

    def __call__(self, token_ids_bt: jax.Array, positions_bt: jax.Array, kv: KVCache,
                 block_tables_bp: jax.Array, is_valid_bt: jax.Array, *,
                 precision: Precision = Precision.STANDARD,
                 attention_backend: AttentionBackend = AttentionBackend.XLA,
                 sliced: dict[str, numerics.SlicedWeight] | None = None) -> tuple[jax.Array, KVCache]:
        """Run T new tokens of B sequences through every layer.

        token_ids_bt, positions_bt: [B, T] int32; positions are absolute.
        block_tables_bp: [B, P] int32 page ids; logical page j of sequence b
            is page block_tables_bp[b, j]. P must cover every valid position.
        is_valid_bt: [B, T] bool; False marks padding, whose K/V is not written
            and whose outputs are meaningless.
        Returns the final-normed hidden states [B, T, D] (under ULTRA a
        double-word (hi, lo), which `logits` takes as it is) and the updated cache.
        All earlier positions of each sequence must already be in the cache.
        attention_backend: the gather path (XLA) or the kernels (PALLAS, STANDARD only); see model.attention.
        sliced: under HIGH and ULTRA, `slice_weights()`'s output, so that no step cuts the weights
            again (the same bits as without).
        """
        cfg = self.config
        x_btd = self._embed(token_ids_bt, precision)
        page_bt, slot_bt = write_slots(positions_bt, block_tables_bp, is_valid_bt,
                                       num_pages=kv.num_pages, page_size=kv.page_size)
        inv_freq_h = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

        def layer_step(carry, layer_in):
            x, k_cache, v_cache = carry
            w, w_sliced, layer = layer_in
            w = {**w, **w_sliced}  # the sliced matrices in place of the plain ones
            h_btd = rms_norm(x, w["input_norm"], cfg.rms_norm_eps, precision)
            q_btnh, k_btkh, v_btkh = self._project_qkv(h_btd, w, positions_bt, inv_freq_h, precision)
            # Write first, then read: this step's tokens attend to each other
            # through the cache, exactly as later steps will see them.
            k_cache = write_layer(k_cache, layer, k_btkh, page_bt, slot_bt)
            v_cache = write_layer(v_cache, layer, v_btkh, page_bt, slot_bt)
            out_btd = attention.paged(q_btnh, k_cache, v_cache, layer, block_tables_bp, positions_bt,
                                      sliding_window=cfg.sliding_window, precision=precision,
                                      backend=attention_backend)
            x = _add(x, self._project_attention(out_btd, w, precision))
            return (_add(x, self._mlp(x, w, precision)), k_cache, v_cache), None

        layer_ids = jnp.arange(cfg.num_layers)
        layers_sliced = {n: s for n, s in (sliced or {}).items() if n in LAYER_WEIGHTS}
        (x, k_cache, v_cache), _ = jax.lax.scan(
            layer_step, (_residual(x_btd, precision), kv.k, kv.v), (self.layers.weights(), layers_sliced, layer_ids))
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, precision), KVCache(k_cache, v_cache)

    def hidden_states(self, token_ids_bt: jax.Array, is_valid_bt: jax.Array, *,
                      precision: Precision = Precision.STANDARD) -> jax.Array:
        """Final-normed hidden states `[B, T, D]` of whole sequences, without a KV cache
        (embeddings; a double-word (hi, lo) under ULTRA).

        Rows are padded on the right; positions count from 0 in each row.
        Padding keys get no weight; padding outputs are meaningless.
        """
        cfg = self.config
        b, t = token_ids_bt.shape
        x_btd = self._embed(token_ids_bt, precision)
        positions_t = jnp.arange(t)
        positions_bt = jnp.broadcast_to(positions_t, (b, t))
        inv_freq_h = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        is_visible_tt = positions_t[None, :] <= positions_t[:, None]
        if cfg.sliding_window is not None:
            is_visible_tt &= positions_t[None, :] > positions_t[:, None] - cfg.sliding_window
        # A padding query sees itself too, so no softmax row is empty (0/0 would
        # spread NaN through the padding's values into later layers).
        is_visible_bts = is_visible_tt[None] & (is_valid_bt[:, None, :] | jnp.eye(t, dtype=bool)[None])

        def layer_step(x, w):
            h_btd = rms_norm(x, w["input_norm"], cfg.rms_norm_eps, precision)
            q_btnh, k_btkh, v_btkh = self._project_qkv(h_btd, w, positions_bt, inv_freq_h, precision)
            out_btd = attention.gathered(q_btnh, k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3),
                                         is_visible_bts, precision=precision)
            x = _add(x, self._project_attention(out_btd, w, precision))
            return _add(x, self._mlp(x, w, precision)), None

        x, _ = jax.lax.scan(layer_step, _residual(x_btd, precision), self.layers.weights())
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, precision)

    def _embed(self, token_ids_bt, precision):
        if self.quantization is not Quantization.NONE:
            x_btd = q8.embed(self.embed_tokens[...], self.embed_tokens_scale[...], token_ids_bt,
                                       self.final_norm[...].dtype)
        else:
            x_btd = self.embed_tokens[...][token_ids_bt]
        return x_btd.astype(jnp.float32) if precision.is_compensated else x_btd

    def _project_qkv(self, h_btd, w, positions_bt, inv_freq_h, precision):
        """Rotated queries `[B, T, N, H]` and keys `[B, T, K, H]`, and values `[B, T, K, H]`."""
        cfg = self.config
        b, t, _ = _value(h_btd).shape
        q, k, v = (numerics.matmul(h_btd, w[name], precision=precision) for name in ("q_proj", "k_proj", "v_proj"))
        if cfg.has_qkv_bias:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        q_btnh = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions_bt, inv_freq_h)
        k_btkh = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions_bt, inv_freq_h)
        return q_btnh, k_btkh, v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)

    def _project_attention(self, out_btd, w, precision):
        """Attention's output `[B, T, N·H]` (a double-word under ULTRA) through o_proj: `[B, T, D]`."""
        if precision is Precision.STANDARD:
            out_btd = out_btd.astype(w["input_norm"].dtype)  # the model's dtype
        return _project_out(out_btd, w["o_proj"], precision)

    def _mlp(self, x_btd, w, precision):
        cfg = self.config
        h_btd = rms_norm(x_btd, w["post_attention_norm"], cfg.rms_norm_eps, precision)
        if precision is Precision.ULTRA:  # double-words from the projections through SiLU and the product
            gate = numerics.exact_matmul(h_btd, w["gate_proj"])
            up = numerics.exact_matmul(h_btd, w["up_proj"])
            product = numerics.double_word_mul(*numerics.double_word_silu(*gate), *up)
            return _project_out(product, w["down_proj"], precision)
        gate_btf = numerics.matmul(h_btd, w["gate_proj"], precision=precision)
        up_btf = numerics.matmul(h_btd, w["up_proj"], precision=precision)
        return _project_out(numerics.silu(gate_btf, precision=precision) * up_btf, w["down_proj"], precision)

    def logits(self, hidden_xd: jax.Array, *, precision: Precision = Precision.STANDARD,
               sliced: dict[str, numerics.SlicedWeight] | None = None) -> jax.Array:
        """LM head over final-normed hidden states `[..., D]` → float32 logits `[..., V]`
        (STANDARD: accumulated in float32 whatever the weights' dtype; HIGH and ULTRA: exact products,
        from `sliced["lm_head"]` when given)."""
        if precision is Precision.STANDARD:
            if self.quantization is Quantization.NONE:
                return jnp.matmul(hidden_xd, self.lm_head_weights(), preferred_element_type=jnp.float32)
            # int8 activations at every row count (model.quantization)
            hidden_xd = hidden_xd.astype(jnp.float32)
            if self.config.tie_word_embeddings:
                return q8.matmul_transposed(hidden_xd, self.embed_tokens[...], self.embed_tokens_scale[...])
            return q8.matmul(hidden_xd, self.lm_head_weights(), dynamic=True)
        head = (sliced or {}).get("lm_head", self.lm_head_weights())
        return numerics.matmul(hidden_xd, head, precision=precision)

    def slice_weights(self, *, integer_dots: bool = False) -> dict[str, numerics.SlicedWeight]:
        """Every matrix HIGH and ULTRA multiply by (the layers' stacked, and the LM head), cut once
        into their slices (numerics.SlicedWeight) for `__call__` and `logits` to take."""
        def cut(w):  # a quantised matrix keeps its scales beside its integers' slices
            if isinstance(w, Int8Weight):
                return Int8Weight(numerics.slice_weight(w.ints, integer_dots=integer_dots), w.scale,
                                  w.dynamic_from_rows)
            return numerics.slice_weight(w, integer_dots=integer_dots)

        layers = self.layers.weights()
        out = {name: cut(layers[name]) for name in MATRICES}
        out["lm_head"] = cut(self.lm_head_weights())
        return out

    def lm_head_weights(self) -> jax.Array | Int8Weight:
        """`[D, V]`: the tied embedding's transpose, or the LM head (an Int8Weight when quantised)."""
        if self.config.tie_word_embeddings:
            return _weight_transposed(self) if self.quantization is not Quantization.NONE else self.embed_tokens[...].T
        return _weight(self, "lm_head")


def _weight_transposed(model: LlamaForCausalLM) -> Int8Weight:
    return Int8Weight(model.embed_tokens[...].T, model.embed_tokens_scale[...])
