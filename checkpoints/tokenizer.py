"""Tokenizers and chat templates, from a model folder (`tokenizer.json`,
`tokenizer_config.json`) or from GGUF metadata, through HF transformers'
fast tokenizers. Nothing is fetched from a model hub: every load is
`local_files_only`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import transformers

from checkpoints.errors import CheckpointError


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
    def from_gguf(cls, path: Path, *, cache_dir: Path | None = None) -> "Tokenizer":
        """The tokenizer a GGUF file's metadata describes, as transformers builds it.

        Building it reads the whole vocabulary out of the file and converts it
        (SmolLM2's: ~5 s of a ~13 s load on 2 cores); the result is saved under
        `cache_dir` (default: tokenizer_cache_dir()), keyed by the file's path, size
        and modification time, and read back from there on later loads (~0.3 s).
        An unwritable cache only costs the conversion.
        """
        cached = (cache_dir or tokenizer_cache_dir()) / _file_key(path)
        if (cached / "tokenizer.json").is_file():
            try:
                return cls(_load(str(cached)), source=str(path))
            except CheckpointError:
                pass  # a damaged cache entry: convert again, below, and overwrite it
        if importlib.util.find_spec("torch") is None:
            # transformers' GGUF reader imports torch; say so instead of its riddle.
            raise CheckpointError(f"{path}: reading a GGUF tokenizer needs PyTorch (the CPU build is "
                                  f"enough): pip install 'balansis[gguf]'")
        tokenizer = cls(_load(str(path.parent), gguf_file=path.name), source=str(path))
        partial = cached.with_name(cached.name + f".partial-{os.getpid()}")
        try:
            tokenizer.save(partial)
            shutil.rmtree(cached, ignore_errors=True)
            partial.rename(cached)  # whole or not at all, when several processes start at once
        except Exception:  # noqa: BLE001 — a cache that cannot be written never fails the load
            shutil.rmtree(partial, ignore_errors=True)
        return tokenizer

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
    """Character → byte of the byte-level BPE alphabet (GPT-2's): printable
    Latin-1 bytes stand for themselves, the other 68 bytes for 256, 257, …"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 256
    for b in range(256):
        if b not in printable:
            table[chr(shifted)] = b
            shifted += 1
    return table


def tokenizer_cache_dir() -> Path:
    """Where tokenizers converted from GGUF files are kept: $XDG_CACHE_HOME/balansis/tokenizers."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "balansis" / "tokenizers"


def _file_key(path: Path) -> str:
    """A name for one version of one file: its resolved path, size and modification time."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _load(location: str, **kwargs):
    try:
        return transformers.AutoTokenizer.from_pretrained(location, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; keep it to one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{location}: cannot load the tokenizer ({message})") from None
