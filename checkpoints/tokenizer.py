"""Tokenizers and chat templates, from a model folder (`tokenizer.json`,
`tokenizer_config.json`) or from GGUF metadata, through HF transformers'
fast tokenizers. Nothing is fetched from a model hub: every load is
`local_files_only`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import gguf
import transformers

from checkpoints.errors import CheckpointError
from checkpoints.gguf_file import open_gguf
from checkpoints.gguf_tokenizer import build_gguf_tokenizer, byte_alphabet


class Tokenizer:
    """Text ↔ token ids, special ids and the chat template of one model."""

    def __init__(self, hf_tokenizer, *, source: str):
        self._hf = hf_tokenizer
        self.source = source

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer_config.json")
        return cls(_load(str(folder)), source=str(folder))

    @classmethod
    def from_gguf(cls, path: Path, *, reader: gguf.GGUFReader | None = None) -> "Tokenizer":
        """The tokenizer a GGUF file's metadata describes (checkpoints.gguf_tokenizer), read
        through `reader` when the file is open already."""
        built = build_gguf_tokenizer(reader or open_gguf(path), source=str(path))
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=built.backend, bos_token=built.bos_token, eos_token=built.eos_token,
            unk_token=built.unk_token, pad_token=built.pad_token, chat_template=built.chat_template,
            clean_up_tokenization_spaces=False)
        return cls(hf, source=str(path))

    def save(self, folder: Path) -> None:
        """Write the tokenizer, its special tokens and chat template into `folder`, in HF's
        files (`tokenizer.json`, `tokenizer_config.json`), which `from_folder` reads back."""
        self._hf.save_pretrained(str(folder))

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of `text`; with max_length, cut to that many (special tokens kept)."""
        if max_length is None:
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens))
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens, truncation=True,
                                    max_length=max_length))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, even when it is part of a UTF-8
        character (whose decoded text would be U+FFFD): OpenAI's logprob `bytes`.
        """
        piece = self._hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if piece in self._hf.get_added_vocab():  # special and added tokens are stored as text
            return piece.encode("utf-8")
        if self._decoder_kind == "byte_level":  # GPT-2 style: each byte is one printable character
            table = _byte_level_decoding()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        elif self._decoder_kind == "sentencepiece":  # ▁ for spaces, <0xNN> for byte fallback
            match = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _decoder_kind(self) -> str | None:
        backend = getattr(self._hf, "backend_tokenizer", None)
        if backend is None:
            return None
        decoder = json.dumps(json.loads(backend.to_str()).get("decoder"))
        if '"ByteLevel"' in decoder:
            return "byte_level"
        if '"ByteFallback"' in decoder or "\u2581" in decoder or "\\u2581" in decoder:
            return "sentencepiece"
        return None

    def render_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """The prompt text the model's chat template makes of `messages`.

        continue_final_message leaves the last (assistant) message open, so
        generation continues it instead of starting a new turn.
        """
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: the model has no chat template")
        return self._hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False)

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> list[int]:
        # The template writes the special tokens itself; adding them again
        # would put a second BOS in front.
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message)
        return self.encode(text, add_special_tokens=False)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoding() -> dict[str, int]:
    """Character → byte of the byte-level BPE alphabet."""
    return {char: byte for byte, char in byte_alphabet().items()}


def _load(location: str, **kwargs):
    try:
        return transformers.AutoTokenizer.from_pretrained(location, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; keep it to one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{location}: cannot load the tokenizer ({message})") from None
