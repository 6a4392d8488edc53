"""Operations routes (/health, /ready, /version, /metrics, /tokenize, /detokenize, /docs)
and the seed API (/api/v1/generate, /api/v1/chat, /models), on the shared live server."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from importlib import metadata

import httpx
import jax
import openai
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import ENGINE_CONFIG, MODEL, start_server

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a river."}]
PREFIX = "balansis:"
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "stability_score")
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_blocks_total",
          "kv_cache_memory_bytes", "model_memory_bytes")
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens", "request_success")


def get(server, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60)


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def scrape(server) -> dict:
    """/metrics as {family name: family}, after checking it parses."""
    response = get(server, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(response.text)}


def value(families: dict, name: str, suffix: str = "", **labels) -> float:
    """The value of sample `balansis:<name><suffix>` with `labels` (model_name is tiny); 0 if absent."""
    family = families[PREFIX + name]
    wanted = {"model_name": MODEL, **labels}
    values = [s.value for s in family.samples if s.name == PREFIX + name + suffix and s.labels == wanted]
    assert len(values) <= 1
    return values[0] if values else 0.0


def unique_prompt() -> str:
    # A fresh first word: no prefix-cache block can match, so every prompt token is computed.
    return f"{uuid.uuid4().hex} was the code word, and the river ran north past the old mill"


def sse_data(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


# -- probes and versions --------------------------------------------------------------------------

def test_health_and_ready(live_server):
    response = get(live_server, "/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    response = get(live_server, "/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_version(live_server):
    response = get(live_server, "/version")
    assert response.status_code == 200
    assert response.json() == {"version": metadata.version("balansis"), "jax": jax.__version__,
                               "backend": jax.default_backend()}


def test_openapi_docs_are_served(live_server):
    response = get(live_server, "/docs/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/api/v1/generate", "/api/v1/chat",
                 "/tokenize", "/detokenize", "/health", "/ready", "/metrics", "/version"):
        assert path in paths, path
    assert get(live_server, "/docs").status_code == 200


# -- metrics --------------------------------------------------------------------------------------

def test_metrics_expose_every_family(live_server):
    with sdk(live_server) as client:  # at least one finished request, so every family has samples
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, extra_body={"ignore_eos": True})
    families = scrape(live_server)
    for name in HISTOGRAMS:
        assert families[PREFIX + name].type == "histogram", name
        assert value(families, name, "_count") >= 1, name
    for name in GAUGES:
        assert families[PREFIX + name].type == "gauge", name
    for name in COUNTERS:
        assert families[PREFIX + name].type == "counter", name
    assert 0 <= value(families, "kv_cache_usage_perc") <= 1
    assert value(families, "request_success", "_total", finished_reason="length") >= 1
    server_wide = {PREFIX + n for n in ("http_requests", "http_request_duration_seconds", "auth_failures",
                                     "rate_limits_unavailable", "usage_records_dropped")}
    for family in families.values():  # everything is ours and labelled with the model (or the device)
        assert family.name.startswith(PREFIX), family.name
        if family.name.removesuffix("_created") in server_wide:  # the HTTP layer's: by route, not by model
            continue
        label = "device" if family.name.startswith(PREFIX + "device_memory") else "model_name"
        assert all(label in s.labels for s in family.samples), family.name
        assert label == "device" or all(s.labels["model_name"] == MODEL for s in family.samples), family.name
    # CPUs report no device memory; GPUs do.
    assert (PREFIX + "device_memory_used_bytes" in families) == (jax.devices()[0].platform == "gpu")


def test_startup_phases_are_exported(live_server):
    """Each finished phase of the model's start, in seconds: the live server places the weights
    and does not warm up, so no compile phase; ready is the whole start."""
    families = scrape(live_server)
    phases = {s.labels["phase"]: s.value for s in families[PREFIX + "startup_seconds"].samples}
    assert set(phases) == {"place", "ready"}
    assert 0 < phases["place"] <= phases["ready"]


def test_memory_figures_are_the_engines(live_server, tiny_loaded):
    """The pool's blocks and bytes and the weights' bytes, as the engine allocated them (float32 on a CPU)."""
    families = scrape(live_server)
    cfg = tiny_loaded.config
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    # The live server's budget, 4 MiB, at most what 8 sequences of 512 tokens fill.
    num_blocks = min(4 * 2**20 // block_bytes, 8 * 512 // 16)
    assert value(families, "kv_cache_blocks_total") == num_blocks
    assert value(families, "kv_cache_memory_bytes") == num_blocks * block_bytes
    weights = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(tiny_loaded.model))) * 4
    assert value(families, "model_memory_bytes") == weights


def test_bfloat16_server_holds_twice_the_blocks(tiny_loaded):
    """`--dtype bfloat16 --kv-cache-dtype bfloat16`: answers through the SDK, and /metrics shows a pool
    of twice float32's blocks in the same budget (here 256 KiB, below the cap), and half the weights' bytes."""
    config = dataclasses.replace(ENGINE_CONFIG, dtype="bfloat16", kv_cache_dtype="bfloat16", kv_cache_memory=2**18)
    server = start_server(tiny_loaded, engine_config=config)
    try:
        with sdk(server) as client:
            reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None
        families = scrape(server)
    finally:
        server.stop()
    cfg = tiny_loaded.config
    float32_blocks = 2**18 // (2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4)
    assert value(families, "kv_cache_blocks_total") == 2 * float32_blocks
    weights = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(tiny_loaded.model))) * 2
    assert value(families, "model_memory_bytes") == weights


def _wait_for(server, name: str, at_least: float, suffix: str = "_total") -> dict:
    """A scrape in which the engine-side counter `name` has reached `at_least`.

    The engine publishes its counters after the step's outputs are handed
    over, so a scrape right after a response may lag one step behind.
    """
    for _ in range(200):
        families = scrape(server)
        if value(families, name, suffix) >= at_least:
            return families
        time.sleep(0.05)
    return families


def test_counters_move_with_requests(live_server):
    before = scrape(live_server)
    with sdk(live_server) as client:
        reply = client.completions.create(model=MODEL, prompt=unique_prompt(), max_tokens=8,
                                          extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    computed = reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens
    after = _wait_for(live_server, "generation_tokens",
                      value(before, "generation_tokens", "_total") + reply.usage.completion_tokens)

    def delta(name, suffix="_total", **labels):
        return value(after, name, suffix, **labels) - value(before, name, suffix, **labels)

    assert delta("prompt_tokens") >= computed > 0
    assert delta("generation_tokens") >= reply.usage.completion_tokens
    assert delta("prefix_cache_queries") >= reply.usage.prompt_tokens
    assert delta("request_success", finished_reason="length") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "stability_score"):
        assert delta(name, "_count") == 1, name
    assert delta("stability_score", "_sum") == reply.choices[0].stability["score"]
    # Every token after the first is one inter-token observation (tokens that arrive together share one gap).
    assert 1 <= delta("inter_token_latency_seconds", "_count") <= reply.usage.completion_tokens - 1
    assert value(after, "num_requests_running") == 0 and value(after, "num_requests_waiting") == 0


def test_prefix_cache_hits_are_counted(live_server):
    prompt = unique_prompt()
    assert len(post(live_server, "/tokenize", {"prompt": prompt}).json()["tokens"]) > 16  # a full block at least
    with sdk(live_server) as client:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        before = scrape(live_server)
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16  # the first request's full blocks are reused
    after = _wait_for(live_server, "prefix_cache_hits", value(before, "prefix_cache_hits", "_total") + cached)
    assert value(after, "prefix_cache_hits", "_total") - value(before, "prefix_cache_hits", "_total") >= cached


def test_abandoned_stream_counts_as_abort(live_server):
    before = value(scrape(live_server), "request_success", "_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": unique_prompt(), "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live_server.v1 + "/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    for _ in range(200):  # the server notices the disconnect on its own time
        if value(scrape(live_server), "request_success", "_total", finished_reason="abort") == before + 1:
            break
        time.sleep(0.05)
    assert value(scrape(live_server), "request_success", "_total", finished_reason="abort") == before + 1
    assert live_server.state.models[MODEL].num_in_flight_seqs == 0


# -- tokenize / detokenize ------------------------------------------------------------------------

def test_tokenize_prompt(live_server, tiny_loaded):
    text = "The quick brown fox jumps over the lazy dog."
    response = post(live_server, "/tokenize", {"prompt": text, "model": MODEL})
    assert response.status_code == 200
    expected = tiny_loaded.tokenizer.encode(text)
    assert response.json() == {"count": len(expected), "max_model_len": 512, "tokens": expected}
    response = post(live_server, "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert response.json()["tokens"] == tiny_loaded.tokenizer.encode(text, add_special_tokens=False)


def test_tokenize_messages_uses_the_chat_template(live_server, tiny_loaded):
    response = post(live_server, "/tokenize", {"messages": MESSAGES})
    assert response.status_code == 200
    with_prompt = tiny_loaded.tokenizer.encode_chat(MESSAGES)
    assert response.json()["tokens"] == with_prompt
    assert response.json()["count"] == len(with_prompt)
    response = post(live_server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    without = tiny_loaded.tokenizer.encode_chat(MESSAGES, add_generation_prompt=False)
    assert response.json()["tokens"] == without != with_prompt


def test_tokenize_needs_exactly_one_input(live_server):
    for body in ({}, {"prompt": "Hi", "messages": MESSAGES}):
        response = post(live_server, "/tokenize", body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt"


def test_detokenize_round_trip(live_server):
    text = "Rivers run to the sea, 42 times — naïvely."
    tokens = post(live_server, "/tokenize", {"prompt": text}).json()["tokens"]
    response = post(live_server, "/detokenize", {"tokens": tokens})
    assert response.status_code == 200
    assert response.json() == {"prompt": text}


@pytest.mark.parametrize("token", [-1, 49152, 10**9])
def test_detokenize_bad_token_id_is_400(live_server, token):
    response = post(live_server, "/detokenize", {"tokens": [1, token]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("tokens", "invalid_value", "invalid_request_error")


# -- the seed API ---------------------------------------------------------------------------------

def test_seed_generate(live_server):
    response = post(live_server, "/api/v1/generate", {"prompt": "Once upon a time", "max_length": 8,
                                                      "temperature": 0.7, "top_p": 0.9})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"generated_text", "tokens_generated", "inference_time", "act_stability_score"}
    assert isinstance(body["generated_text"], str)
    assert 0 < body["tokens_generated"] <= 8
    assert body["inference_time"] > 0
    assert 0 <= body["act_stability_score"] <= 1


@pytest.mark.parametrize("path,body", [
    ("/api/v1/generate", {"prompt": "Hi", "max_length": 4, "act_precision": "extreme"}),
    ("/api/v1/chat", {"messages": MESSAGES, "max_length": 4, "act_precision": "Ultra"}),
])
def test_seed_unknown_precision_levels_are_400(live_server, path, body):
    response = post(live_server, path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("act_precision", "invalid_value")
    assert body["act_precision"] in error["message"]


def test_seed_chat(live_server):
    response = post(live_server, "/api/v1/chat", {"messages": MESSAGES, "model": MODEL, "max_length": 8})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == MODEL
    assert body["message"]["role"] == "assistant" and isinstance(body["message"]["content"], str)
    assert 0 < body["tokens_generated"] <= 8
    assert body["finish_reason"] in ("stop", "length")
    assert (body["finish_reason"] == "length") == (body["tokens_generated"] == 8)
    assert body["inference_time"] > 0 and 0 <= body["act_stability_score"] <= 1


def test_seed_chat_stream(live_server):
    body = {"messages": MESSAGES, "stream": True, "max_length": 12}
    with httpx.stream("POST", live_server.url + "/api/v1/chat", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_data(response)
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    deltas = [json.loads(e) for e in events[:-2]]
    assert deltas and all(set(d) == {"delta"} and d["delta"] for d in deltas)
    assert final["model"] == MODEL and final["message"]["role"] == "assistant"
    assert "".join(d["delta"] for d in deltas) == final["message"]["content"]
    assert 0 < final["tokens_generated"] <= 12 and 0 <= final["act_stability_score"] <= 1


def test_seed_models(live_server):
    response = get(live_server, "/models")
    assert response.status_code == 200
    assert response.json() == {"models": [{"name": MODEL, "type": "chat", "max_model_len": 512,
                                           "precision_levels": ["standard", "high", "ultra"]}]}


def _http(families: dict, name: str, suffix: str = "_total", **labels) -> float:
    family = families[PREFIX + name]
    return sum(s.value for s in family.samples if s.name == PREFIX + name + suffix and s.labels == labels)


def test_http_requests_are_counted_by_route_template(live_server):
    """Route templates and HTTP's own methods as labels, never raw paths: the label set stays
    bounded whatever clients send (scanners, typos, odd methods)."""
    before = scrape(live_server)
    with sdk(live_server) as client:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        client.models.retrieve(MODEL)
    for path in ("/no/such/route", f"/random/{uuid.uuid4().hex}"):
        assert httpx.get(live_server.url + path, timeout=60).status_code == 404
    assert 400 <= httpx.request("FROB", live_server.url + "/v1/models", timeout=60).status_code < 500
    after = scrape(live_server)

    def delta(name, suffix="_total", **labels):
        return _http(after, name, suffix, **labels) - _http(before, name, suffix, **labels)

    assert delta("http_requests", method="POST", route="/v1/chat/completions", status="200") == 1
    assert delta("http_requests", method="GET", route="/v1/models/{model_id}", status="200") == 1
    assert delta("http_requests", method="GET", route="unmatched", status="404") == 2
    assert delta("http_request_duration_seconds", "_count", method="POST", route="/v1/chat/completions") == 1
    routes = {s.labels["route"] for s in after[PREFIX + "http_requests"].samples}
    methods = {s.labels["method"] for s in after[PREFIX + "http_requests"].samples}
    assert not any("no/such" in r or "random" in r for r in routes) and "FROB" not in methods
