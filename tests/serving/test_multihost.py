"""`balansis serve` across 2 processes on localhost, 4 CPU devices each
(JAX's distributed runtime, CPU collectives over gloo), one 8-device mesh of
tensor-parallel 4 × data-parallel 2: process 0 serves HTTP and schedules,
process 1 runs the same compiled steps. Through the official `openai` SDK,
its completions equal one process's (greedy tokens; logprobs within 1e-5),
also after an idle spell longer than process 1's wait for the next call;
when process 0 is stopped, process 1 exits too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest

from checkpoints.tokenizer import Tokenizer
from engine import distributed
from engine.llm import LLM
from engine.llm_engine import EngineConfig
from engine.sampling import SamplingParams
from tests.serving.conftest import free_port, wait_until_ready

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
MAX_TOKENS = 8
FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8", "--kv-cache-memory", "8MiB", "--no-warmup",
         "--no-compilation-cache"]


@pytest.fixture(scope="module")
def tiny_folder(tiny_loaded, tmp_path_factory):
    """The tiny random Llama (4 heads, 2 KV heads, SmolLM2's vocabulary) with its tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-multihost")
    for name in os.listdir(tiny_loaded.path):
        (folder / name).write_bytes((tiny_loaded.path / name).read_bytes())
    tiny_loaded.tokenizer.save(folder)
    return folder


def _one_process(folder: Path) -> list[tuple[list[int], list[float]]]:
    llm = LLM(folder, config=EngineConfig(max_model_len=256, max_num_seqs=8, kv_cache_memory=8 * 2**20))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outputs]


def test_two_processes_serve_as_one(tiny_folder):
    port, coordinator = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_folder), "--served-model-name", "tiny",
         "--port", str(port), "-tp", "4", "-dp", "2", "--num-processes", "2", "--process-id", str(i),
         "--coordinator-address", f"127.0.0.1:{coordinator}", "--log-level", "warning", *FLAGS],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [[] for _ in processes]
    readers = [threading.Thread(target=lambda p=p, log=log: log.extend(p.stdout), daemon=True)
               for p, log in zip(processes, logs)]
    for reader in readers:
        reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ready(url, processes):
            pytest.fail("the 2-process server did not become ready:\n" + "".join(logs[0][-30:] + logs[1][-30:]))

        # Idle for longer than a follower's wait: its waits time out and resume.
        time.sleep(distributed.POLL_MS / 1000 + 1)
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        results: list = [None] * len(PROMPTS)

        def complete(i: int) -> None:  # at once: the steps batch them
            choice = api.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
                                            logprobs=1, extra_body={"ignore_eos": True}).choices[0]
            results[i] = choice

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        # Embeddings of a decoder would run on process 0 alone: refused, and the server goes on.
        with pytest.raises(openai.NotFoundError, match="2 processes"):
            api.embeddings.create(model="tiny", input="Hello")
        assert api.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].text is not None

        processes[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        for i, log in enumerate(logs):  # shown by pytest when the test fails
            print(f"--- process {i} ---\n" + "".join(line for line in log if "[Gloo]" not in line)[-5000:])
    assert codes == [0, 0]

    reference = _one_process(tiny_folder)
    tokenizer = Tokenizer.from_folder(tiny_folder)
    for choice, (ref_ids, ref_logprobs) in zip(results, reference):
        assert choice.text == tokenizer.decode(ref_ids)  # the same greedy tokens
        assert len(choice.logprobs.token_logprobs) == len(ref_logprobs) == MAX_TOKENS
        assert np.abs(np.array(choice.logprobs.token_logprobs) - np.array(ref_logprobs)).max() <= 1e-5
