"""Clients that leave, and a server told to stop.

- Disconnects: a client that goes away (streaming or not) aborts its
  request; its KV blocks are freed and the other requests run to the end.
- SIGTERM: `balansis serve` (a process of its own) answers new requests
  with 503 while in-flight streams finish, then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import MODEL, free_port, wait_until_ready


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in metrics.items()
               if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items()))


def _wait_idle(url: str, timeout: float = 60) -> dict:
    """Metrics once no sequence runs, waits or holds KV blocks (or the last seen at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = _metrics(url)
        idle = (_value(metrics, "balansis:num_requests_running") == 0
                and _value(metrics, "balansis:num_requests_waiting") == 0
                and _value(metrics, "balansis:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_32_streams_with_8_disconnects_free_every_block(live_server):
    max_tokens = 24
    before = _wait_idle(live_server.url)
    aborts_before = _value(before, "balansis:request_success_total", finished_reason="abort")

    async def client(i: int, api: openai.AsyncOpenAI):
        leaves = i % 4 == 0  # 8 of 32
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Story number {i}, please."}],
            max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        num_chunks, usage, finish = 0, None, None
        async for chunk in stream:
            num_chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
            if leaves and num_chunks == 3:
                await stream.close()  # hang up mid-stream
                return None
        return usage, finish

    async def run():
        async with openai.AsyncOpenAI(base_url=live_server.v1, api_key="none", max_retries=0) as api:
            return await asyncio.gather(*(client(i, api) for i in range(32)))

    results = asyncio.run(run())
    completed = [r for r in results if r is not None]
    assert len(completed) == 24
    for usage, finish in completed:
        assert finish == "length"
        assert usage.completion_tokens == max_tokens

    after = _wait_idle(live_server.url)
    assert _value(after, "balansis:kv_cache_usage_perc") == 0
    assert _value(after, "balansis:num_requests_running") == 0
    assert _value(after, "balansis:num_requests_waiting") == 0
    assert _value(after, "balansis:request_success_total", finished_reason="abort") - aborts_before == 8
    assert live_server.state.models[MODEL].num_in_flight_seqs == 0


def test_a_non_streaming_client_that_leaves_aborts_its_request(live_server):
    before = _wait_idle(live_server.url)
    aborts_before = _value(before, "balansis:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.v1 + "/completions", json=body, timeout=httpx.Timeout(10, read=0.2))
    after = _wait_idle(live_server.url)
    assert _value(after, "balansis:request_success_total", finished_reason="abort") - aborts_before == 1
    assert _value(after, "balansis:kv_cache_usage_perc") == 0


def test_sigterm_lets_running_streams_finish_then_exits_0(tiny_model_dir, minilm_folder):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Two models, as an operator would serve a chat model and an embedding model.
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", MODEL, "--model", str(minilm_folder), "--served-model-name", "minilm",
         "--no-warmup", "--max-num-seqs", "8", "--max-model-len", "512",
         "--kv-cache-memory", "16MiB", "--no-access-log", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_until_ready(url, [process]):
            pytest.fail(f"the server did not become ready: {process.communicate(timeout=10)[0]}")

        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in api.models.list().data} == {MODEL, "minilm"}
        assert len(api.embeddings.create(model="minilm", input="Hello").data[0].embedding) == 384
        max_tokens = 400
        started = threading.Barrier(9)
        results: list = [None] * 8

        def stream(i: int) -> None:
            chunks = api.completions.create(model=MODEL, prompt=f"Request {i}:", max_tokens=max_tokens,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
            text, usage, finish, waited = "", None, None, False
            for chunk in chunks:
                if not waited:
                    started.wait(timeout=120)  # every stream is running before the signal
                    waited = True
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text += choice.text
                    finish = choice.finish_reason or finish
            results[i] = (usage, finish)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait(timeout=120)
        process.send_signal(signal.SIGTERM)
        # Draining: new work is refused with a 503, and the server is not ready.
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2},
                             timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "service_unavailable"
        assert httpx.get(url + "/ready", timeout=30).status_code == 503
        for t in threads:
            t.join(timeout=300)
        assert process.wait(timeout=120) == 0
        for usage, finish in results:
            assert finish == "length"
            assert usage.completion_tokens == max_tokens
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
