"""Tokenizers and chat templates, from a model folder (`tokenizer.json`,
`tokenizer_config.json`) or from GGUF metadata, through HF transformers'
fast tokenizers. Nothing is fetched from a model hub: every load is
`local_files_only`.
"""

from __future__ import annotations

import importlib.util
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
    def from_gguf(cls, path: Path) -> "Tokenizer":
        if importlib.util.find_spec("torch") is None:
            # transformers' GGUF reader imports torch; say so instead of its riddle.
            raise CheckpointError(f"{path}: reading a GGUF tokenizer needs PyTorch (the CPU build is "
                                  f"enough): pip install 'balansis[gguf]'")
        return cls(_load(str(path.parent), gguf_file=path.name), source=str(path))

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

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


def _load(location: str, **kwargs):
    try:
        return transformers.AutoTokenizer.from_pretrained(location, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; keep it to one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{location}: cannot load the tokenizer ({message})") from None
