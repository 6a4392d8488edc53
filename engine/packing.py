"""One host→device transfer per call: every step input packed into one buffer.

A step has a couple of dozen small inputs (token ids, positions, block
tables, per-row sampling parameters). Passing them separately costs one
transfer each; instead they are laid end to end in one int32 buffer (float32
and uint32 reinterpreted bit for bit, booleans as 0/1) and split again inside
the compiled program. The layout — the pytree structure, shapes and dtypes —
is static, so it is part of the compiled program's key, as the shapes were.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    treedef: Any  # jax.tree_util.PyTreeDef: hashable
    leaves: tuple[tuple[tuple[int, ...], str], ...]  # (shape, dtype name) per leaf


def pack(tree) -> tuple[np.ndarray, Layout]:
    """Flatten a pytree of numpy arrays (int32, uint32, float32, bool) into one int32 buffer."""
    leaves, treedef = jax.tree.flatten(tree)
    parts, specs = [], []
    for leaf in leaves:
        array = np.asarray(leaf)
        dtype = array.dtype
        if dtype == np.bool_:
            part = array.astype(np.int32)
        elif dtype in (np.int32, np.uint32, np.float32):
            part = array.view(np.int32)
        else:
            raise TypeError(f"cannot pack dtype {dtype}")
        parts.append(part.ravel())
        specs.append((array.shape, dtype.name))
    return np.concatenate(parts), Layout(treedef, tuple(specs))


def unpack(buffer_n: jax.Array, layout: Layout):
    """Inside a compiled program: the pytree `pack` flattened, from its buffer."""
    leaves, offset = [], 0
    for shape, dtype_name in layout.leaves:
        size = int(np.prod(shape, dtype=np.int64))
        part = buffer_n[offset:offset + size].reshape(shape)
        offset += size
        if dtype_name == "bool":
            leaves.append(part != 0)
        elif dtype_name == "int32":
            leaves.append(part)
        else:
            leaves.append(jax.lax.bitcast_convert_type(part, jnp.dtype(dtype_name)))
    return jax.tree.unflatten(layout.treedef, leaves)
