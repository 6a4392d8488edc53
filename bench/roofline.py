"""How close the forward comes to the device's limits: decode bandwidth, prefill FLOPs.

    python -m bench.roofline                                   # shapes that fit; batch 1 and 64; every backend
    python -m bench.roofline --shapes smollm2-135m --batches 1 --backends xla
    python -m bench.roofline --batches 1 4 16 64 --quantizations none int8 int8-dynamic

Random-weight Llama shapes (SmolLM2-135M, a Llama-3.2-1B shape, a Llama-3-8B
shape; a shape whose weights and cache would not fit in 80% of the device's
memory is skipped, and on a CPU only the smallest runs unless named), in the
engine's dtype (`--dtype auto`: bfloat16 on a GPU, float32 on a CPU), through
the model's paged forward with the LM head at each row's last token — the
program the engine runs per step, without the sampler.

- Decode: B rows, each at position `--context` over a cache that holds it;
  step time is the median of `--steps` timed calls after two untimed ones.
  Model-bandwidth utilisation (MBU) = (bytes of weights + KV read per step) /
  step time / the device's bandwidth. The ceiling beside it is the tok/s at
  which that traffic would take the device's whole bandwidth (batch-1 decode
  of an 8B bfloat16 model on an H200, 4.8 TB/s: about 300 tok/s).
- `--quantizations`: the same weights as float, and int8 with float or
  per-token int8 activations (model.quantization); MBU counts the bytes
  each actually reads.
- Prefill: one row of `--prefill-tokens` tokens from position 0. Model-FLOP
  utilisation (MFU) = (2 · matmul weights · tokens + causal attention's
  4 · layers · heads · head_dim · T(T+1)/2) / time / the device's peak.

The device's limits: a GPU's datasheet figures (dense bfloat16 tensor-core
FLOP/s, or float32 without tensor cores, and HBM bandwidth) where its kind is
known; on a CPU, measured here: the read bandwidth of a sum over 1 GiB and the
FLOP/s of a 2048³ float32 matmul. Results go to `bench/results/roofline-<UTC
timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.results_file import RESULTS_DIR, write_report
from bench.throughput import machine_info, source_revision

PAGE_SIZE = 16

SHAPES = {  # Llama shapes: hidden, layers, heads, KV heads, MLP width, vocabulary, tied embeddings
    "smollm2-135m": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                         vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                     vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                     vocab_size=128256, tie_word_embeddings=False),
}

# Datasheet figures: (dense bfloat16 FLOP/s, float32 FLOP/s without tensor cores, bytes/s of memory).
GPU_LIMITS = {
    "H200": (989e12, 67e12, 4.8e12),
    "H100": (989e12, 67e12, 3.35e12),  # SXM
    "A100": (312e12, 19.5e12, 2.0e12),  # 80 GB SXM
    "L40S": (362e12, 91.6e12, 0.864e12),
    "L4": (121e12, 30.3e12, 0.3e12),
}


@dataclasses.dataclass
class Row:
    shape: str
    phase: str  # decode or prefill
    backend: str
    quantization: str
    batch: int
    tokens: int  # context (decode) or prompt length (prefill)
    seconds: float  # one step (decode) or the whole prefill
    tokens_per_s: float
    utilisation: float  # MBU (decode) or MFU (prefill)
    ceiling_tokens_per_s: float  # where the device's bandwidth (decode) or FLOP/s (prefill) would cap it


def device_limits(dtype) -> dict:
    """The device's peak FLOP/s at `dtype` and its memory bandwidth: a datasheet's or measured."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, (bf16, f32, bandwidth) in GPU_LIMITS.items():
            if name in device.device_kind:
                return dict(source=f"datasheet ({name})", flops_per_s=bf16 if dtype == jnp.bfloat16 else f32,
                            bytes_per_s=bandwidth)
    x = jnp.ones((2**28,), jnp.float32)  # 1 GiB
    total = jax.jit(jnp.sum)
    bandwidth = x.nbytes / _best_seconds(lambda: total(x))
    a = jnp.ones((2048, 2048), jnp.float32)
    product = jax.jit(jnp.matmul)
    flops = 2 * 2048**3 / _best_seconds(lambda: product(a, a))
    return dict(source="measured", flops_per_s=flops, bytes_per_s=bandwidth)


def _best_seconds(fn, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def build(shape: str, dtype):
    from flax import nnx

    from model.config import DecoderConfig
    from model.llama import LlamaForCausalLM

    dims = SHAPES[shape]
    cfg = DecoderConfig(model_type="llama", **dims, head_dim=dims["hidden_size"] // dims["num_heads"],
                        max_position_embeddings=8192)
    return cfg, LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every layer weight, the final norm, the LM head
    (a tied embedding in full); of an untied embedding table only B rows (not counted)."""
    from engine.memory import tree_bytes
    from flax import nnx

    total = tree_bytes(nnx.state(model))
    return total if model.config.tie_word_embeddings else total - model.embed_tokens[...].nbytes


def layer_matmul_weights(cfg) -> int:
    """Weights a token multiplies in the layers' projections."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * f)


def _median_seconds(forward, state, kv, inputs, *, untimed: int, timed: int):
    """The median wall time of `timed` calls after `untimed` ones (compiling among them), and the cache."""
    import jax

    times = []
    for i in range(untimed + timed):
        start = time.perf_counter()
        logits, kv = forward(state, kv, *inputs)
        jax.block_until_ready(logits)
        if i >= untimed:
            times.append(time.perf_counter() - start)
    return statistics.median(times), kv


def forward_function(graphdef, backend):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def forward(state, kv, ids_bt, positions_bt, tables_bp, valid_bt):
        model = nnx.merge(graphdef, state)
        hidden_btd, kv = model(ids_bt, positions_bt, kv, tables_bp, valid_bt, attention_backend=backend)
        last_b = jnp.sum(valid_bt, axis=1) - 1
        hidden_bd = jnp.take_along_axis(hidden_btd, last_b[:, None, None], axis=1)[:, 0]
        return model.logits(hidden_bd), kv

    return jax.jit(forward, donate_argnums=(1,))


def run_shape(shape: str, args, dtype, kv_dtype, limits: dict, rows: list[Row]) -> None:
    """Measure one shape; each row is appended to `rows` as soon as it is measured."""
    import jax.numpy as jnp
    from flax import nnx

    from model.attention import AttentionBackend
    from model.kv_cache import KVCache
    from model.quantization import Quantization

    cfg, float_model = build(shape, dtype)
    kv_itemsize = jnp.dtype(kv_dtype).itemsize
    for quantization, backend_name in ((q, b) for q in args.quantizations for b in args.backends):
        model = float_model.quantized(Quantization(quantization))
        weights_read = weight_bytes_per_step(model)
        graphdef, state = nnx.split(model)
        backend = AttentionBackend(backend_name)
        forward = forward_function(graphdef, backend)
        for batch in args.batches:
            pages_per_row = -(-(args.context + 1) // PAGE_SIZE)
            kv = KVCache.zeros(cfg, num_pages=batch * pages_per_row, page_size=PAGE_SIZE, dtype=kv_dtype)
            tables = jnp.arange(batch * pages_per_row, dtype=jnp.int32).reshape(batch, pages_per_row)
            ids = jnp.zeros((batch, 1), jnp.int32)
            positions = jnp.full((batch, 1), args.context, jnp.int32)
            valid = jnp.ones((batch, 1), bool)
            step, kv = _median_seconds(forward, state, kv, (ids, positions, tables, valid), untimed=2,
                                       timed=args.steps)
            kv_read = batch * (args.context + 1) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
            traffic = weights_read + kv_read
            rows.append(Row(shape, "decode", backend_name, quantization, batch, args.context, step, batch / step,
                            traffic / step / limits["bytes_per_s"], batch * limits["bytes_per_s"] / traffic))
            print(_format(rows[-1]), flush=True)
            del kv
        t = args.prefill_tokens
        pages = -(-t // PAGE_SIZE)
        kv = KVCache.zeros(cfg, num_pages=pages, page_size=PAGE_SIZE, dtype=kv_dtype)
        tables = jnp.arange(pages, dtype=jnp.int32)[None]
        ids = jnp.zeros((1, t), jnp.int32)
        positions = jnp.arange(t, dtype=jnp.int32)[None]
        valid = jnp.ones((1, t), bool)
        seconds, kv = _median_seconds(forward, state, kv, (ids, positions, tables, valid), untimed=1,
                                      timed=min(args.steps, 5))
        # Every token through the layers, the LM head at the last one only, causal attention.
        flops = 2 * layer_matmul_weights(cfg) * t + 2 * cfg.hidden_size * cfg.vocab_size \
            + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * (t + 1) // 2
        rows.append(Row(shape, "prefill", backend_name, quantization, 1, t, seconds, t / seconds,
                        flops / seconds / limits["flops_per_s"], t * limits["flops_per_s"] / flops))
        print(_format(rows[-1]), flush=True)
        del kv


def fits(shape: str, args, dtype, kv_dtype) -> bool:
    import jax
    import jax.numpy as jnp

    dims = SHAPES[shape]
    head_dim = dims["hidden_size"] // dims["num_heads"]
    d, f, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_layers"]
    q, kv = dims["num_heads"] * head_dim, dims["num_kv_heads"] * head_dim
    params = layers * (2 * d * q + 2 * d * kv + 3 * d * f) + d * dims["vocab_size"] * (1 if dims["tie_word_embeddings"] else 2)
    kv_bytes = max(args.batches) * (args.context + PAGE_SIZE) * 2 * layers * kv * jnp.dtype(kv_dtype).itemsize
    total = params * jnp.dtype(dtype).itemsize + kv_bytes
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:  # a CPU: the smallest shape unless named
        return shape == "smollm2-135m" or args.shapes is not None
    return total < 0.8 * stats["bytes_limit"]


def _format(row: Row) -> str:
    kind = "MBU" if row.phase == "decode" else "MFU"
    return (f"{row.shape:13s} {row.phase:7s} {row.backend:6s} {row.quantization:12s} B={row.batch:<3d} tokens={row.tokens:<5d} "
            f"{row.seconds * 1e3:9.2f} ms  {row.tokens_per_s:10.1f} tok/s  {kind} {row.utilisation:6.1%}  "
            f"ceiling {row.ceiling_tokens_per_s:10.1f} tok/s")


def format_table(rows: list[Row]) -> str:
    header = ("shape", "phase", "backend", "weights", "batch", "tokens", "ms", "tok/s", "MBU / MFU", "ceiling tok/s")
    lines = [header] + [(r.shape, r.phase, r.backend, r.quantization, str(r.batch), str(r.tokens), f"{r.seconds * 1e3:.2f}",
                         f"{r.tokens_per_s:.1f}", f"{r.utilisation:.1%}", f"{r.ceiling_tokens_per_s:.1f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None,
                        help="default: every shape that fits (on a CPU: smollm2-135m)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--context", type=int, default=512, help="decode: each row's position (default 512)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--backends", nargs="+", choices=["xla", "pallas"], default=None,
                        help="default: both on a GPU; xla on a CPU, where the Pallas kernel is interpreted "
                             "(about 60 s a step at batch 64: a check, not a speed)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--quantizations", nargs="+", choices=["none", "int8", "int8-dynamic"], default=["none"],
                        help="weights as --dtype (none) and/or int8 (model.quantization); default none")
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps (default 10)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    import jax

    from engine.memory import resolve_dtype

    dtype = resolve_dtype(args.dtype, jax.devices()[0].platform)
    if args.backends is None:
        args.backends = ["xla", "pallas"] if jax.devices()[0].platform == "gpu" else ["xla"]
    limits = device_limits(dtype)
    print(f"device: {jax.devices()[0].device_kind}; {limits['source']}: {limits['flops_per_s'] / 1e12:.2f} TFLOP/s, "
          f"{limits['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    rows = []
    # Under `timeout` (the GPU check), SIGTERM ends the run with the rows measured so far written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    try:
        for shape in args.shapes or list(SHAPES):
            if not fits(shape, args, dtype, dtype):
                print(f"{shape}: skipped (does not fit, or a CPU and not named)", flush=True)
                continue
            run_shape(shape, args, dtype, dtype, limits, rows)
    finally:
        write_results(rows, args, dtype, limits)
    return 0


def write_results(rows: list[Row], args, dtype, limits: dict) -> None:
    report = dict(benchmark="roofline", machine=machine_info(), source=source_revision(),
                  dtype=np.dtype(dtype).name, device_limits=limits, args=vars(args),
                  rows=[dataclasses.asdict(r) for r in rows])
    path = write_report("roofline", report, results_dir=Path(args.results_dir))
    print(format_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
