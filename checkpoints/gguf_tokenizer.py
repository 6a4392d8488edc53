"""The tokenizer a GGUF file's metadata describes, built with `tokenizers` alone.

A GGUF file carries no `tokenizer.json`: llama.cpp's converter stores the vocabulary
(`tokenizer.ggml.tokens`), per-token scores and types, BPE merges, the special ids and the
chat template as metadata. This module rebuilds the fast tokenizer from those keys, so
reading a GGUF model needs neither PyTorch (transformers' GGUF reader imports it) nor a
converted copy on disk. The two vocabulary kinds of the Llama family:

- `gpt2`: byte-level BPE (Llama 3, Qwen2, SmolLM2). Merges are stored; text is split
  before merging by the regex the vocabulary was trained with, named by `tokenizer.ggml.pre`.
- `llama`: SentencePiece BPE (Llama 2, Mistral). `▁` stands for a space, unknown bytes fall
  back to `<0xNN>` tokens; merges, when not stored, follow from the vocabulary and its scores.

Token types (llama.cpp's): 3 is a control token (`<|im_end|>`, `<s>`), matched whole and
skipped by `skip_special_tokens`; 4 is user-defined (`<think>`), matched whole, kept in text.
"""

from __future__ import annotations

import dataclasses
import functools

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from checkpoints.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer regexes by `tokenizer.ggml.pre`: how each vocabulary splits text before BPE.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# Any other `pre` (`default`, `gpt-2`, `smollm`, …) gets GPT-2's own regex, which ByteLevel applies.


@dataclasses.dataclass(frozen=True, slots=True)
class GgufTokenizer:
    """What the metadata says: the fast tokenizer and the settings around it."""
    backend: Tokenizer
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    chat_template: str | None


def build_gguf_tokenizer(reader: gguf.GGUFReader, *, source: str) -> GgufTokenizer:
    """The tokenizer of the GGUF file `reader` has open; CheckpointError when it has none we can build."""
    def key(name, default=None):
        field = reader.fields.get(f"tokenizer.{name}")
        return default if field is None else field.contents()

    kind = key("ggml.model")
    tokens = key("ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError(f"{source}: the GGUF file has no tokenizer (no tokenizer.ggml.model or tokens)")
    token_types = key("ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, key("ggml.merges"), key("ggml.pre"), source=source)
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, key("ggml.scores"), key("ggml.merges"),
                                     unk_id=key("ggml.unknown_token_id"),
                                     add_space_prefix=key("ggml.add_space_prefix", True), source=source)
    else:
        raise CheckpointError(f"{source}: GGUF tokenizer model {kind!r} is not supported "
                              f"(supported: gpt2, llama)")
    _add_whole_tokens(backend, tokens, token_types, byte_level=kind == "gpt2")

    def token(id_key: str) -> str | None:
        index = key(id_key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("ggml.bos_token_id"), token("ggml.eos_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = bool(key("ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(key("ggml.add_eos_token", False)) and eos is not None
    backend.post_processor = _special_tokens_around(backend, bos if add_bos else None, eos if add_eos else None)
    return GgufTokenizer(backend=backend, bos_token=bos, eos_token=eos, unk_token=token("ggml.unknown_token_id"),
                         pad_token=token("ggml.padding_token_id"), chat_template=key("chat_template"))


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, pre: str | None, *, source: str) -> Tokenizer:
    if not merges:
        raise CheckpointError(f"{source}: a byte-level (gpt2) GGUF tokenizer without tokenizer.ggml.merges")
    alphabet = set(byte_alphabet().values())
    # Every vocabulary entry is spelled in the byte alphabet (Ġ for a space); an entry with other
    # characters is spelled there byte by byte, as the BPE model looks pieces up.
    vocab = {}
    for index, text in enumerate(tokens):
        spelled = text if set(text) <= alphabet else "".join(byte_alphabet()[b] for b in text.encode("utf-8"))
        vocab.setdefault(spelled, index)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges, source), fuse_unk=False,
                                   byte_fallback=False))
    split = _SPLITS.get(pre)
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, merges: list[str] | None, *,
                       unk_id: int | None, add_space_prefix: bool, source: str) -> Tokenizer:
    vocab = {}
    for index, text in enumerate(tokens):
        vocab.setdefault(text, index)
    if merges:
        pairs = _merge_pairs(merges, source)
    elif scores:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    else:
        raise CheckpointError(f"{source}: a SentencePiece (llama) GGUF tokenizer with neither merges nor scores")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:  # the space the pre-tokenizer put in front of the text comes off again
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merge_pairs(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source}: GGUF merge {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two
    tokens of the vocabulary, the token with the higher score merged first (SentencePiece
    scores BPE pieces by the order they were learned)."""
    ranked = []
    for text, score in scores.items():
        splits = [(text[:i], text[i:]) for i in range(1, len(text)) if text[:i] in vocab and text[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, left, right) for left, right in splits)
    # Higher score first; among equal scores the longer left piece, then the longer right one.
    ranked.sort(key=lambda item: (item[0], len(item[1]), len(item[2])), reverse=True)
    return [(left, right) for _, left, right in ranked]


def _add_whole_tokens(backend: Tokenizer, tokens: list[str], token_types: list[int], *, byte_level: bool) -> None:
    """Control and user-defined tokens are matched whole in the text, never cut into pieces."""
    alphabet = set(byte_alphabet().values()) if byte_level else None
    # A "control" token outside the byte alphabet of a byte-level vocabulary is a mislabelled
    # entry (a piece of text, not a marker): adding it would change how that text is cut.
    control = [AddedToken(text, normalized=False, special=True)
               for text, kind in zip(tokens, token_types)
               if kind == CONTROL and (alphabet is None or set(text) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    user_defined = [AddedToken(text, normalized=False, special=False)
                    for text, kind in zip(tokens, token_types) if kind == USER_DEFINED]
    if user_defined:
        backend.add_tokens(user_defined)


def _special_tokens_around(backend: Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """BOS before and EOS after each text, as the file's add_bos_token / add_eos_token say."""
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(text, backend.token_to_id(text)) for text in {bos, eos} if text]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """Byte → character of the byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes stand
    for themselves, the other 68 bytes for U+0100, U+0101, …"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in printable:
            table[b] = chr(shifted)
            shifted += 1
    return table
