"""Tensor and data parallelism on 8 CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, in a subprocess: the
device count is fixed when JAX starts): the engine over a tp × dp mesh gives
the same greedy tokens as one device and logprobs and logits within 1e-5
under `standard`, and the very same bits under `ultra`; an Orbax checkpoint
restores onto the mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints import orbax_dir
from checkpoints.safetensors_dir import load_decoder
from tests.hf_reference import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
RUNS = ("1x1/standard", "2x1/standard", "4x1/standard", "1x2/standard", "2x2/standard",
        "1x1/ultra", "4x1/ultra", "2x1/standard@orbax",
        "1x1/standard+int8-dynamic", "2x2/standard+int8-dynamic", "1x1/high+int8", "4x1/high+int8")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, smollm2) -> dict:
    folder = tmp_path_factory.mktemp("tiny-sharded")
    hf_model = save_tiny_model("llama", folder, max_position_embeddings=256)  # 4 heads, 2 KV heads
    orbax_folder = tmp_path_factory.mktemp("tiny-sharded-orbax") / "converted"
    _, model = load_decoder(folder)
    orbax_dir.save(model, smollm2.tokenizer, orbax_folder, source=str(folder))
    del hf_model, model
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.engine.sharded_worker", str(folder), ",".join(RUNS),
                           str(orbax_folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _largest_difference(a: dict, b: dict) -> float:
    def floats(run):
        return np.concatenate([np.ravel(x) for key in ("logprobs", "prompt_logprobs")
                               for rows in run[key] for x in rows] + [np.ravel(run["logits"])])
    return float(np.abs(floats(a) - floats(b)).max())


@pytest.mark.parametrize("mesh", ["2x1", "4x1", "1x2", "2x2"])
def test_standard_on_a_mesh_matches_one_device(sharded_runs, mesh):
    one, many = sharded_runs["runs"]["1x1/standard"], sharded_runs["runs"][f"{mesh}/standard"]
    assert many["tokens"] == one["tokens"]
    difference = _largest_difference(one, many)
    print(f"{mesh} standard: largest logprob/logit difference from one device {difference:.3g}")
    assert difference <= 1e-5


def test_ultra_on_a_mesh_gives_the_same_bits(sharded_runs):
    """Four-way tensor parallel, KV heads replicated: the hardest split for the bits."""
    one, many = sharded_runs["runs"]["1x1/ultra"], sharded_runs["runs"]["4x1/ultra"]
    assert many["tokens"] == one["tokens"]
    assert _largest_difference(one, many) == 0.0


def test_int8_weights_on_a_mesh_match_one_device(sharded_runs):
    """Scales split as their columns; STANDARD within float rounding, HIGH the same bits."""
    runs = sharded_runs["runs"]
    one, many = runs["1x1/standard+int8-dynamic"], runs["2x2/standard+int8-dynamic"]
    assert many["tokens"] == one["tokens"]
    assert _largest_difference(one, many) <= 1e-5
    one, many = runs["1x1/high+int8"], runs["4x1/high+int8"]
    assert many["q_proj_shard_shape"] == [3, 64, 16] and many["q_proj_scale_shard_shape"] == [3, 16]
    assert many["tokens"] == one["tokens"]
    assert _largest_difference(one, many) == 0.0


def test_weights_and_cache_are_split_as_the_rules_say(sharded_runs):
    runs = sharded_runs["runs"]
    assert sharded_runs["devices"] == 8
    # q_proj [layers, hidden, heads × head_dim] = [3, 64, 64]: column-parallel.
    assert runs["1x1/standard"]["q_proj_shard_shape"] == [3, 64, 64]
    assert runs["2x1/standard"]["q_proj_shard_shape"] == [3, 64, 32]
    assert runs["4x1/standard"]["q_proj_shard_shape"] == [3, 64, 16]
    assert runs["1x2/standard"]["q_proj_shard_shape"] == [3, 64, 64]  # data parallel: replicated
    # The cache [layers, KV heads, pages, page, head_dim]: 2 KV heads split over tp 2,
    # replicated over tp 4 (fewer KV heads than shards).
    assert runs["2x1/standard"]["kv_heads_split"] and runs["2x1/standard"]["kv_cache_shard_shape"][1] == 1
    assert not runs["4x1/standard"]["kv_heads_split"] and runs["4x1/standard"]["kv_cache_shard_shape"][1] == 2


def test_an_orbax_checkpoint_restores_onto_the_mesh(sharded_runs):
    """Each parameter restored straight onto its shard: the same bits as the source placed there."""
    from_source, restored = sharded_runs["runs"]["2x1/standard"], sharded_runs["runs"]["2x1/standard@orbax"]
    assert restored["q_proj_shard_shape"] == [3, 64, 32]
    assert restored["tokens"] == from_source["tokens"]
    assert _largest_difference(from_source, restored) == 0.0


def test_a_shape_that_cannot_be_split_is_refused_before_loading(sharded_runs):
    assert sharded_runs["unsplittable"] == (
        "tensor-parallel size 3 does not divide the model's attention heads (4)")
