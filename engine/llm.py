"""`LLM`: the Python API for scripts and offline jobs.

    llm = LLM()  # the default model
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.7))

All prompts are submitted at once and run with continuous batching; outputs
come back in the order of the prompts.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Mapping, Sequence

from checkpoints.loader import LoadedModel, load_model
from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

Messages = Sequence[Mapping[str, str]]


class LLM:
    def __init__(self, model: str | Path | LoadedModel | None = None, *,
                 config: EngineConfig = EngineConfig()):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if not isinstance(model, LoadedModel):
            model = load_model(model, dtype=config.weight_dtype(), mesh=config.mesh())
        loaded = model
        self.engine = LLMEngine(loaded, config)
        self.tokenizer = loaded.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids); one RequestOutput per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(prompt_ids, params)

    def chat(self, conversations: Messages | Sequence[Messages],
             params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]
        prompt_ids = [self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt)
                      for c in conversations]
        return self._run(prompt_ids, params)

    def _run(self, prompt_ids: list[list[int]], params) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError(f"{len(params)} sampling params for {len(prompt_ids)} prompts")
        request_ids = [f"llm-{next(self._ids)}" for _ in prompt_ids]
        finished: dict[str, RequestOutput] = {}
        try:
            for request_id, ids, p in zip(request_ids, prompt_ids, params):
                self.engine.add_request(request_id, ids, p)
            while len(finished) < len(request_ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return [finished[r] for r in request_ids]
