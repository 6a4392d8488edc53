"""Tiny GGUF files that hold only a tokenizer, written as llama.cpp's converter writes one:
a vocabulary trained here with `tokenizers` on a small corpus, then stored under the
`tokenizer.ggml.*` keys (tokens, types, scores or merges, special ids, chat template).

Two kinds, as in the Llama family: byte-level BPE (`gpt2`, with a `pre` naming the split
regex) and SentencePiece BPE (`llama`, `▁` for spaces, `<0xNN>` byte fallback, merges
stored or left for the reader to derive from the scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, and we'll see 1234567 numbers.",
    "def main(argv):\n    return 0\n\nclass Tokenizer:\n\tpass  # tabs and    spaces",
    "Hello, world! Hello there; hello again? I'm sure they're fine, you've said so.",
    "Naïve café résumé — über straße. Données: 3.14159, 2.71828, 42%.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>",
] * 20

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]


def _writer(path: Path, kind: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-{kind}-tokenizer")
    writer.add_tokenizer_model(kind)
    writer.add_chat_template(CHAT_TEMPLATE)
    return writer


def _close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_byte_level_gguf(path: Path, *, pre: str, vocab_size: int = 600, add_bos: bool = False) -> Path:
    """A `gpt2` (byte-level BPE) tokenizer; `pre` names the split regex, as `tokenizer.ggml.pre`."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BYTE_LEVEL_SPECIALS + ["<think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(trained.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    types = [CONTROL if t in BYTE_LEVEL_SPECIALS else USER_DEFINED if t == "<think>" else NORMAL for t in tokens]
    writer = _writer(path, "gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_add_space_prefix(False)
    _close(writer)
    return path


def write_sentencepiece_gguf(path: Path, *, with_merges: bool, vocab_size: int = 700) -> Path:
    """A `llama` (SentencePiece BPE) tokenizer: `<unk> <s> </s>`, the 256 byte tokens, then
    pieces learned here scored by the order they were learned (as SentencePiece scores BPE)."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    learned = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = SENTENCEPIECE_SPECIALS + byte_tokens + learned
    # Single characters first (the alphabet), then merged pieces, each scored below the one before.
    scores = [0.0] * (len(SENTENCEPIECE_SPECIALS) + 256) + [-float(rank) for rank in range(len(learned))]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(learned)
    writer = _writer(path, "llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if with_merges:
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    _close(writer)
    return path
