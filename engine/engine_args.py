"""Command-line flags of the engine, mapped one to one onto `EngineConfig`.

Every subcommand that runs the engine (`generate`, `run-batch`, later
`serve` and `bench`) adds these with `add_engine_arguments` and builds its
config with `engine_config_from_args`.
"""

from __future__ import annotations

import argparse
import re

from engine import memory
from engine.compilation_cache import default_cache_dir
from engine.distributed import add_distributed_arguments
from engine.llm_engine import EngineConfig
from model import attention, quantization
from model.numerics import Precision

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_memory(text: str) -> int | float:
    """'0.8' → a fraction of free device memory; '4GiB', '512MiB', '1000000' → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a fraction in (0, 1] nor a size such as 4GiB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and "." in match.group(1):
        if not 0 < number <= 1:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text!r}")
        return number
    if number * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is no memory at all")
    return int(number * _UNITS[unit])


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + completion in tokens (default: the model's, at most 8192)")
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                       help="sequences running at once (default: %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                       help="token budget of one step; decodes go first (default: %(default)s)")
    group.add_argument("--block-size", type=int, default=defaults.block_size,
                       help="tokens per KV cache page (default: %(default)s)")
    group.add_argument("--kv-cache-memory", type=parse_memory, default=None,
                       help="KV cache size per device: bytes (4GiB, 512MiB) or a fraction of the device memory "
                            "the weights leave (0.8); default 0.9 of it, 2GiB on CPU")
    group.add_argument("--dtype", choices=memory.DTYPES, default=defaults.dtype,
                       help="of the weights and activations: auto (bfloat16 on a GPU, float32 elsewhere), "
                            "float32 or bfloat16; norm statistics, RoPE, softmax and logits stay float32 "
                            "(default: %(default)s)")
    group.add_argument("--kv-cache-dtype", choices=memory.DTYPES, default=defaults.kv_cache_dtype,
                       help="of the KV cache, which is sized from it: auto (bfloat16 on a GPU, float32 "
                            "elsewhere), float32 or bfloat16 (default: %(default)s)")
    group.add_argument("--quantization", choices=quantization.CHOICES, default=defaults.quantization,
                       help="of the weights: none; int8 (per-channel int8 matrices, embedding and LM head, a "
                            "quarter of float32's bytes; activations stay float); or int8-dynamic (also the "
                            "activations per token from 32 rows: faster under load, less accurate). Every "
                            "precision level computes with the int8 weights (default: %(default)s)")
    group.add_argument("--precision", choices=[p.value for p in Precision], default=defaults.precision,
                       help="numerics level of requests that do not choose one: standard (plain float32 "
                            "here), high (compensated, batch-invariant) or ultra (also error-free matmuls "
                            "and double-word activations) (default: %(default)s)")
    group.add_argument("--high-precision-share", type=float, default=defaults.high_precision_share,
                       help="the most of the engine's time high and ultra calls may take while standard "
                            "requests wait, so an expensive request cannot stall the cheap ones: standard's "
                            "mean inter-token latency grows by at most 1/(1 - share) (1: no limit; default: "
                            "%(default)s)")
    group.add_argument("--attention-backend", choices=attention.CHOICES, default=defaults.attention_backend,
                       help="attention kernels: auto (Pallas paged attention and cuDNN on a GPU at standard "
                            "precision, the XLA gather path elsewhere), xla, or pallas (the kernels; in "
                            "Pallas interpret mode off a GPU, slowly) (default: %(default)s)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
                       help="devices each weight matrix is split over (default: %(default)s)")
    group.add_argument("--data-parallel-size", "-dp", type=int, default=defaults.data_parallel_size,
                       help="replicas of the weights, each running its share of a step's batch "
                            "(default: %(default)s)")
    group.add_argument("--no-prefix-caching", action="store_true",
                       help="do not reuse the KV cache of repeated prompt prefixes")
    group.add_argument("--warmup", action="store_true",
                       help="compile every bucketed program before serving")
    group.add_argument("--compilation-cache", default=str(default_cache_dir()),
                       help="directory of JAX's persistent compilation cache (default: %(default)s)")
    group.add_argument("--no-compilation-cache", action="store_true",
                       help="do not keep compiled programs on disk")


    add_distributed_arguments(parser)


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    values = dict(
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
        precision=args.precision, high_precision_share=args.high_precision_share,
        attention_backend=args.attention_backend, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        warmup=args.warmup,
        compilation_cache_dir=None if args.no_compilation_cache else args.compilation_cache)
    values.update(overrides)
    return EngineConfig(**values)
