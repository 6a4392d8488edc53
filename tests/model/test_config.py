"""DecoderConfig from HF config.json contents, in both transformers 4 and 5 spellings."""

from __future__ import annotations

import pytest

from model.config import ConfigError, DecoderConfig, RopeType

BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_defaults_and_derived_head_dim():
    cfg = DecoderConfig.from_hf_dict(BASE)
    assert cfg.head_dim == 16 and cfg.num_queries_per_kv == 2
    assert cfg.rope_scaling.rope_type is RopeType.DEFAULT and cfg.sliding_window is None


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_in_either_spelling(spelling):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    hf = {**BASE, spelling: rope}
    if spelling == "rope_parameters":
        rope["rope_theta"] = 500000.0
    else:
        hf["rope_theta"] = 500000.0
    cfg = DecoderConfig.from_hf_dict(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling.rope_type is RopeType.LLAMA3 and cfg.rope_scaling.factor == 8.0


def test_family_differences():
    assert DecoderConfig.from_hf_dict({**BASE, "model_type": "qwen2"}).has_qkv_bias
    assert DecoderConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    assert DecoderConfig.from_hf_dict({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    assert DecoderConfig.from_hf_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096}).sliding_window is None


@pytest.mark.parametrize("change, fragment", [
    ({"model_type": "gpt2"}, "unknown architecture"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_rejections(change, fragment):
    hf = {**BASE, **change}
    if hf["vocab_size"] is None:
        del hf["vocab_size"]
    with pytest.raises(ConfigError, match=fragment):
        DecoderConfig.from_hf_dict(hf)
