"""Engine flags map onto EngineConfig; memory sizes parse as documented."""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import pytest

from engine.engine_args import add_engine_arguments, engine_config_from_args, parse_memory
from engine.llm_engine import EngineConfig


@pytest.mark.parametrize("text, value", [("0.8", 0.8), ("1.0", 1.0), ("4GiB", 4 * 2**30),
                                         ("512MiB", 512 * 2**20), ("1000000", 1000000), ("2G", 2 * 2**30),
                                         ("1.5GB", 1_500_000_000)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "-1", "4 lightyears", "1.5", "0.0", "0", "GiB"])
def test_parse_memory_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory(text)


def test_flags_to_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--kv-cache-memory",
                              "0.5", "--no-prefix-caching", "--compilation-cache", str(tmp_path)])
    config = engine_config_from_args(args)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.kv_cache_memory) == (8, 64, 0.5)
    assert not config.enable_prefix_caching and config.compilation_cache_dir == str(tmp_path)
    assert engine_config_from_args(parser.parse_args(["--no-compilation-cache"])).compilation_cache_dir is None


def test_dtype_and_attention_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    defaults = engine_config_from_args(parser.parse_args([]))
    assert (defaults.dtype, defaults.kv_cache_dtype, defaults.attention_backend) == ("auto", "auto", "auto")
    config = engine_config_from_args(parser.parse_args(
        ["--dtype", "bfloat16", "--kv-cache-dtype", "bfloat16", "--attention-backend", "pallas"]))
    assert (config.dtype, config.kv_cache_dtype, config.attention_backend) == ("bfloat16", "bfloat16", "pallas")
    # On a CPU, auto is float32 (as before); bfloat16 is what was asked for.
    assert (defaults.weight_dtype(), defaults.cache_dtype()) == (jnp.float32, jnp.float32)
    assert (config.weight_dtype(), config.cache_dtype()) == (jnp.bfloat16, jnp.bfloat16)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float16"])


def test_config_rejects_unknown_dtypes_and_backends():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
