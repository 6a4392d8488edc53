"""Model math: configs, layers, families and numerics — pure functions of (weights, arrays)."""
