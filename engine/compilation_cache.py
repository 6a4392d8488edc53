"""JAX's persistent compilation cache: compiled programs saved on disk, so a
restarted server or a second run skips most compilation."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "balansis" / "jax"


def enable_compilation_cache(path: str | Path) -> None:
    """Store every compiled program under `path` (process-wide, as JAX's cache is)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache even quick compilations: the decode programs of a small model
    # compile in under a second each, but there are dozens of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
