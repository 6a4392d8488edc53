"""Device memory: the dtypes the engine computes and caches in, what the weights take, what the
KV pool may take, and what the devices report.

On a GPU, JAX preallocates a pool (by default 75% of the device) and serves
every array from it; `memory_stats()` reports that pool as `bytes_limit` and
what is allocated from it as `bytes_in_use`. The KV budget is a fraction of
what the weights leave in that pool, so the cache and JAX's allocator draw
on the same memory and never compete for it. `configure_preallocation` (the
CLI calls it first) makes the pool 95% of the device instead of 75%, so the
remaining tenth of the budget (the default `--kv-cache-memory` is 0.9) holds
XLA's temporaries, and the rest of the device is not left idle.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

DTYPES = ("auto", "float32", "bfloat16")
CPU_DEFAULT_KV_BYTES = 2 * 2**30  # CPUs report no memory limit to size a fraction of
GPU_PREALLOCATED_FRACTION = "0.95"


def configure_preallocation() -> None:
    """Size JAX's GPU pool (before any device is used), unless the operator already did."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_PREALLOCATED_FRACTION)


def resolve_dtype(name: str, platform: str):
    """`auto` is bfloat16 on GPUs and float32 elsewhere (CPUs have no fast bfloat16 matmul)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        return jnp.bfloat16 if platform == "gpu" else jnp.float32
    return jnp.dtype(name).type


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (their global sizes, over all devices)."""
    return sum(a.nbytes for a in jax.tree.leaves(tree))


def kv_budget(kv_cache_memory: int | float | None, mesh) -> int:
    """Bytes of KV cache per device from the config value (see EngineConfig): a fraction
    of the free memory of the mesh's fullest device, read after the weights are placed."""
    if isinstance(kv_cache_memory, int):
        return kv_cache_memory
    fraction = 0.9 if kv_cache_memory is None else kv_cache_memory
    stats = [d.memory_stats() or {} for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not stats or any("bytes_limit" not in s for s in stats):
        return int(CPU_DEFAULT_KV_BYTES * (fraction / 0.9 if kv_cache_memory is not None else 1))
    return int(fraction * min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats))


def device_memory() -> list[tuple[str, int, int]]:
    """(device, bytes in use, bytes limit) of this process's devices that report them (GPUs do; CPUs do not)."""
    out = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            out.append((f"{device.platform}:{device.id}", int(stats.get("bytes_in_use", 0)), int(stats["bytes_limit"])))
    return out
