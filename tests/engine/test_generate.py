"""`balansis generate` end to end on the default model, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.llm import LLM
from engine.llm_engine import EngineConfig
from engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

MESSAGE = "Name three fruits."


def _balansis(*args):
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_chat_prints_the_greedy_completion(smollm2):
    result = _balansis("generate", "--chat", MESSAGE, "--max-tokens", "16")
    assert result.returncode == 0, result.stderr

    tokenizer = smollm2.tokenizer
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": MESSAGE}])
    llm = LLM(smollm2, config=EngineConfig(max_model_len=256))
    tokens = llm.generate([prompt_ids], SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0].token_ids
    assert result.stdout == tokenizer.decode(tokens) + "\n"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{len(tokens)} tokens in "), summary


def test_generate_with_the_pallas_kernels_gives_the_gather_paths_tokens():
    """`--attention-backend pallas` (interpret mode here): the prompt (34 tokens) through the fused dense
    prefill, every later token through the paged decode kernel; the same greedy text as the gather path."""
    args = ("generate", "--chat", MESSAGE, "--max-tokens", "24", "--max-model-len", "256")
    gather, kernels = _balansis(*args, "--attention-backend", "xla"), _balansis(*args, "--attention-backend", "pallas")
    assert gather.returncode == 0 and kernels.returncode == 0, gather.stderr + kernels.stderr
    assert kernels.stdout == gather.stdout and gather.stdout.strip()


def test_generate_seeded_sampling_is_reproducible():
    args = ("generate", "--prompt", "Once upon a time", "--max-tokens", "12",
            "--temperature", "0.9", "--top-p", "0.95", "--seed", "1234")
    first, second = _balansis(*args), _balansis(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_generate_rejects_bad_arguments():
    result = _balansis("generate", "--prompt", "hi", "--top-p", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("balansis: error: top_p")
    assert "Traceback" not in result.stderr
