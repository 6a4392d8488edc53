"""Engine flags map onto EngineConfig; memory sizes parse as documented."""

from __future__ import annotations

import argparse

import pytest

from engine.engine_args import add_engine_arguments, engine_config_from_args, parse_memory


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
