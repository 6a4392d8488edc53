"""Every error the server answers, and that it keeps serving after each.

Requests go through the official `openai` SDK where it can send them (it
must raise its usual exception class: BadRequestError for a 400, …) and
through httpx where it cannot (a body that is not JSON, a missing key).
Every error body is OpenAI's, `{"error": {"message", "type", "param",
"code"}}` with a string code. Servers with settings of their own (API keys,
a one-sequence engine, a model that never loads) are started here; the
rest use the shared `live_server`.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Callable, TypeVar

import httpx
import openai
import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from serving.state import ModelSpec, ServeConfig, ServerState
from serving.request_limits import RequestLimits
from tests.serving.conftest import MODEL, LiveServer, start_server

T = TypeVar("T")
MESSAGES = [{"role": "user", "content": "Hello"}]
# One sequence at a time and no queue: a second request while one runs is a 429.
SINGLE_SEQ_ENGINE = EngineConfig(max_model_len=512, max_num_seqs=1, max_num_batched_tokens=64,
                                 kv_cache_memory=4 * 2**20)


def sdk(server: LiveServer, api_key: str = "unused") -> openai.OpenAI:
    # No retries: the SDK retries 429s and 5xx by default, which would hide them.
    return openai.OpenAI(base_url=server.v1, api_key=api_key, max_retries=0, timeout=120)


def error_of(response, *, status: int, code: str, param: str | None = None,
             kind: str = "invalid_request_error") -> dict:
    """The error object of an OpenAI-shaped error response, after checking its shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str)
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    return error


def sdk_error(info: pytest.ExceptionInfo, **expected) -> dict:
    """The same checks on an SDK exception, whose attributes must agree with the body."""
    exc = info.value
    error = error_of(exc.response, **expected)
    assert (exc.status_code, exc.code, exc.param, exc.type) == (
        expected["status"], error["code"], error["param"], error["type"])
    return error


def assert_serves(server: LiveServer, api_key: str = "unused") -> None:
    """A normal request succeeds."""
    with sdk(server, api_key) as client:
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1


def post_raw(server: LiveServer, path: str, content: bytes, **headers) -> httpx.Response:
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json", **headers})


def wait_until(check: Callable[[], T], what: str, *, tries: int = 600) -> T:
    """Poll `check` until it returns something true (bounded; asserts nothing about time)."""
    for _ in range(tries):
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# -- 400: invalid values, never 422 ------------------------------------------------------------

CHAT_400 = {
    "a string temperature": ({"temperature": "hot"}, "temperature", "invalid_value"),
    "a bool max_tokens": ({"max_tokens": True}, "max_tokens", "invalid_value"),
    "messages not a list": ({"messages": "hello"}, "messages", "invalid_value"),
    "an unknown field": ({"extra_body": {"frobnicate": 1}}, "frobnicate", "unknown_parameter"),
    "an unknown message field": ({"messages": [{"role": "user", "content": "x", "mood": "sad"}]},
                                 "messages[0].mood", "unknown_parameter"),
    "negative max_tokens": ({"max_tokens": -1}, "max_tokens", "invalid_value"),
    "zero max_completion_tokens": ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    "temperature below 0": ({"temperature": -0.5}, "temperature", "invalid_value"),
    "top_p above 1": ({"top_p": 1.5}, "top_p", "invalid_value"),
    "a bad role": ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    "no messages": ({"messages": []}, "messages", "invalid_value"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    "over the context": ({"max_tokens": 600}, "max_tokens", "context_length_exceeded"),
    "max_completion_tokens over the context": ({"max_completion_tokens": 600}, "max_completion_tokens",
                                               "context_length_exceeded"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
              "unsupported_parameter"),
    "response_format json_object": ({"response_format": {"type": "json_object"}}, "response_format",
                                    "unsupported_parameter"),
    "an image part": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages[0].content",
        "unsupported_parameter"),
}


@pytest.mark.parametrize("case", list(CHAT_400))
def test_invalid_chat_request_is_400(live_server, case):
    fields, param, code = CHAT_400[case]
    with sdk(live_server) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields})
    error = sdk_error(info, status=400, code=code, param=param)
    if code != "invalid_value":
        assert param in error["message"]
    assert_serves(live_server)


COMPLETION_400 = {
    "suffix": ({"suffix": "and so on"}, "suffix", "unsupported_parameter"),
    "a prompt over the context": ({"prompt": "hello " * 600}, "prompt", "context_length_exceeded"),
    "a prompt that is a number": ({"prompt": 7}, "prompt", "invalid_value"),
    "echo as a string": ({"echo": "yes"}, "echo", "invalid_value"),
    "logprobs over 20": ({"logprobs": 21}, "logprobs", "invalid_value"),
    "a token id outside the vocabulary": ({"prompt": [1, 10**9]}, "prompt", "invalid_value"),
}


@pytest.mark.parametrize("case", list(COMPLETION_400))
def test_invalid_completion_request_is_400(live_server, case):
    fields, param, code = COMPLETION_400[case]
    with sdk(live_server) as client, pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": MODEL, "prompt": "Once", "max_tokens": 4, **fields})
    sdk_error(info, status=400, code=code, param=param)
    assert_serves(live_server)


RAW_400 = {
    "malformed JSON": b'{"model": "tiny", "messages": [',
    "not JSON at all": b"\xff\xfe not json",
    "a JSON array": b'[{"role": "user", "content": "hi"}]',
    "a JSON string": b'"hello"',
    "JSON null": b"null",
    "an empty body": b"",
}


@pytest.mark.parametrize("case", list(RAW_400))
def test_body_that_is_not_an_object_is_400(live_server, case):
    response = post_raw(live_server, "/v1/chat/completions", RAW_400[case])
    error = error_of(response, status=400, code="invalid_value")
    # The message says what is wrong with the body, not an internal name.
    assert error["message"] not in ("'data'", "data")
    assert_serves(live_server)


POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/generate", "/api/v1/chat",
               "/api/v1/embeddings", "/tokenize", "/detokenize")
TOO_DEEP = {"an array a thousand deep": b"[" * 1000 + b"]" * 1000,
            "a field a thousand deep": b'{"model": "tiny", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"}


@pytest.mark.parametrize("case", list(TOO_DEEP))
def test_json_nested_past_the_decoders_limit_is_400_on_every_post_route(live_server, case):
    """A fuzz run found `[[[[…]]]]` a 500 (a RecursionError) on every POST route."""
    for route in POST_ROUTES:
        error = error_of(post_raw(live_server, route, TOO_DEEP[case]), status=400, code="invalid_value")
        assert "nested too deeply" in error["message"], (route, error)
    assert_serves(live_server)


def test_values_a_float32_cannot_hold_are_400(live_server):
    """`temperature: 1e308` used to pass the range check and overflow to infinity in the sampler."""
    for fields in ({"temperature": 1e308}, {"repetition_penalty": 1e39}):
        response = httpx.post(live_server.v1 + "/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields})
        error = error_of(response, status=400, code="invalid_value", param=next(iter(fields)))
        assert "float32" in error["message"]
    error_of(httpx.post(live_server.url + "/api/v1/generate", json={"prompt": "Hi", "temperature": 1e308},
                        timeout=60), status=400, code="invalid_value", param="temperature")
    assert_serves(live_server)


def test_validation_errors_are_never_422(live_server):
    """What msgspec refuses is a 400 naming the field, as OpenAI's own checks are."""
    cases = [({"n": "many"}, "n", "invalid_value"),
             ({"stop": 5}, "stop", "invalid_value"),
             ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage", "invalid_value"),
             ({"messages": [{"content": "no role"}]}, "messages[0].role", "missing_required_parameter"),
             ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_value")]
    for fields, param, code in cases:
        response = httpx.post(live_server.v1 + "/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": MESSAGES, **fields})
        error_of(response, status=400, code=code, param=param)
    assert_serves(live_server)


def test_seed_api_invalid_values_are_400(live_server):
    url = live_server.url + "/api/v1/generate"
    cases = [({"prompt": "Hi", "max_length": 0}, "max_length", "invalid_value"),
             ({"prompt": "Hi", "max_length": 600}, "max_length", "context_length_exceeded"),
             ({"prompt": "Hi", "temperature": -1.0}, "temperature", "invalid_value"),
             ({"prompt": "Hi", "max_length": 4, "colour": "red"}, "colour", "unknown_parameter"),
             ({"max_length": 4}, "prompt", "missing_required_parameter"),
             ({"prompt": ""}, "prompt", "invalid_value")]
    for body, param, code in cases:
        error = error_of(httpx.post(url, json=body, timeout=60), status=400, code=code, param=param)
        if param == "max_length":  # the seed API's name, in the message too (not the engine's max_tokens)
            assert "max_length" in error["message"] and "max_tokens" not in error["message"], error
    error = error_of(httpx.post(url, json={"prompt": "Hi", "max_length": -1}, timeout=60), status=400,
                     code="invalid_value", param="max_length")
    assert error["message"].startswith("max_length"), error
    error_of(httpx.post(live_server.url + "/api/v1/chat", json={"messages": [{"role": "x", "content": "y"}]},
                        timeout=60), status=400, code="invalid_value", param="messages[0].role")
    assert_serves(live_server)


# -- 404 ------------------------------------------------------------------------------------------

def test_unknown_model_is_404(live_server):
    with sdk(live_server) as client:
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
        error = sdk_error(info, status=404, code="model_not_found", param="model")
        assert "gpt-4o" in error["message"]
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
        sdk_error(info, status=404, code="model_not_found", param="model")
    for path, body in (("/api/v1/chat", {"messages": MESSAGES, "model": "gpt-4o"}),
                       ("/tokenize", {"prompt": "Hi", "model": "gpt-4o"})):
        error_of(httpx.post(live_server.url + path, json=body, timeout=60), status=404,
                 code="model_not_found", param="model")
    assert_serves(live_server)


def test_unknown_route_is_404(live_server):
    with sdk(live_server) as client:
        with pytest.raises(openai.NotFoundError) as info:
            client.moderations.create(input="Hi")  # /v1/moderations: not served
        sdk_error(info, status=404, code="not_found")
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("no-such-model")
        sdk_error(info, status=404, code="model_not_found", param="model")
    error_of(httpx.get(live_server.url + "/no/such/route", timeout=60), status=404, code="not_found")
    assert_serves(live_server)


def test_wrong_method_is_405_with_an_error_body(live_server):
    error_of(httpx.get(live_server.v1 + "/chat/completions", timeout=60), status=405,
             code="method_not_allowed")
    assert_serves(live_server)


# -- 401, 413: a server with API keys and a small body limit ---------------------------------------

@pytest.fixture(scope="module")
def guarded_server(tiny_loaded):
    """API keys k1 and k2, and bodies of at most 2 KiB (one server for both, to compile once); no limit
    on refused credentials, which these tests send many of (its own test below)."""
    server = start_server(tiny_loaded, api_keys=("k1", "k2"), max_body_bytes=2048, max_auth_failures_per_minute=None)
    yield server
    server.stop()


def test_missing_api_key_is_401(guarded_server):
    for method, path in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("POST", "/tokenize"), ("POST", "/api/v1/generate"), ("GET", "/models")):
        response = httpx.request(method, guarded_server.url + path, timeout=60,
                                 json={"model": MODEL, "messages": MESSAGES} if method == "POST" else None)
        error_of(response, status=401, code="invalid_api_key", kind="authentication_error")


def test_refused_credentials_are_counted(guarded_server):
    def failures():
        text = httpx.get(guarded_server.url + "/metrics", timeout=60).text
        return float(re.search(r"^balansis:auth_failures_total (\S+)$", text, re.M).group(1))
    before = failures()
    for headers in ({}, {"Authorization": "Bearer k3"}):
        httpx.get(guarded_server.v1 + "/models", headers=headers, timeout=60)
    assert failures() == before + 2


def test_wrong_api_key_is_401(guarded_server):
    with sdk(guarded_server, api_key="k3") as client, pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    sdk_error(info, status=401, code="invalid_api_key", kind="authentication_error")
    for authorization in ("Basic k1", "k1", "Bearer k1k2", "Bearer"):
        response = httpx.post(guarded_server.v1 + "/chat/completions", timeout=60,
                              json={"model": MODEL, "messages": MESSAGES}, headers={"Authorization": authorization})
        error_of(response, status=401, code="invalid_api_key", kind="authentication_error")
    # The key is checked before the body: a stranger learns nothing about it.
    response = post_raw(guarded_server, "/v1/chat/completions", b"{not json", Authorization="Bearer k3")
    error_of(response, status=401, code="invalid_api_key", kind="authentication_error")


def test_right_api_keys_work(guarded_server):
    assert_serves(guarded_server, api_key="k1")
    with sdk(guarded_server, api_key="k2") as client:
        assert [m.id for m in client.models.list()] == [MODEL]
    response = httpx.post(guarded_server.url + "/tokenize", json={"prompt": "Hi"},
                          headers={"Authorization": "Bearer k2"}, timeout=60)
    assert response.status_code == 200 and response.json()["count"] >= 1


def test_probes_and_docs_are_open_without_a_key(guarded_server):
    for path in ("/health", "/ready", "/metrics", "/docs/openapi.json"):
        assert httpx.get(guarded_server.url + path, timeout=60).status_code == 200, path
    assert httpx.get(guarded_server.url + "/version", timeout=60).status_code == 401  # versions: for key holders


def test_body_over_the_limit_is_413(guarded_server):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1000}], "max_tokens": 2}
    with sdk(guarded_server, api_key="k1") as client, pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**big)
    sdk_error(info, status=413, code="request_too_large")
    # Without Content-Length (chunked) the limit holds too.
    payload = json.dumps(big).encode()
    response = httpx.post(guarded_server.v1 + "/chat/completions", timeout=60,
                          content=(payload[i:i + 512] for i in range(0, len(payload), 512)),
                          headers={"Content-Type": "application/json", "Authorization": "Bearer k1"})
    assert "content-length" not in response.request.headers
    error_of(response, status=413, code="request_too_large")
    assert_serves(guarded_server, api_key="k1")


# -- 429, and draining: a server that runs one sequence and queues none ---------------------------

@pytest.fixture(scope="module")
def single_server(tiny_loaded):
    server = start_server(tiny_loaded, engine_config=SINGLE_SEQ_ENGINE, max_queue=0)
    yield server
    server.stop()


def _open_stream(client: openai.OpenAI, max_tokens: int):
    """A streamed chat that has started (one chunk read), and its iterator."""
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant"
    return stream, chunks


def test_full_queue_is_429_with_retry_after(single_server):
    state = single_server.state
    with sdk(single_server) as client:
        stream, _ = _open_stream(client, max_tokens=400)  # long enough to be running throughout
        try:
            assert state.models[MODEL].num_in_flight_seqs == 1
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            sdk_error(info, status=429, code="rate_limit_exceeded", kind="rate_limit_error")
            assert int(info.value.response.headers["Retry-After"]) >= 1
            with pytest.raises(openai.RateLimitError):  # a stream is refused before it starts
                client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream=True)
            response = httpx.post(single_server.url + "/api/v1/generate", json={"prompt": "Hi", "max_length": 2},
                                  timeout=60)
            error_of(response, status=429, code="rate_limit_exceeded", kind="rate_limit_error")
            assert "retry-after" in response.headers
            assert state.models[MODEL].num_in_flight_seqs == 1  # the held stream is still running
        finally:
            stream.close()
    # The client left: its sequence is released and the next request is served.
    wait_until(lambda: state.models[MODEL].num_in_flight_seqs == 0, "the closed stream released its admission")
    assert_serves(single_server)


@pytest.mark.parametrize("route,body", [
    ("/api/v1/chat", {"messages": MESSAGES, "max_length": 16, "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 16, "stream": True}),
])
def test_concurrent_streams_are_admitted_or_refused_before_they_start(single_server, route, body):
    """Streams sent together: each is a clean 200 stream or a 429, never a 200 carrying a 429 event."""

    async def one(client: httpx.AsyncClient) -> tuple[int, list[str]]:
        async with client.stream("POST", single_server.url + route, json=body) as response:
            return response.status_code, [line async for line in response.aiter_lines()]

    async def together() -> list[tuple[int, list[str]]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(4)))

    results = asyncio.run(together())
    assert any(status == 200 for status, _ in results)
    for status, lines in results:
        if status == 200:
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in event for event in events), events
        else:
            assert status == 429, lines
            error_of(httpx.Response(429, content="".join(lines).encode()), status=429, code="rate_limit_exceeded",
                     kind="rate_limit_error")
    wait_until(lambda: single_server.state.models[MODEL].num_in_flight_seqs == 0, "every stream released its admission")
    assert_serves(single_server)


def test_stream_whose_client_left_before_its_first_byte_gives_its_seats_back(single_server):
    """The admission a stream's handler took is released when its response ends, even
    when the client left before the response started, so the events never ran."""
    from litestar.testing import RequestFactory

    from serving.generation import AdmittedStream, Charge
    from serving.usage import UsageMeter

    state = single_server.state
    admission = state.models[MODEL].admit(1)  # what a stream's handler holds
    started = []

    async def events():
        started.append(True)
        yield "[DONE]"

    async def gone(_message):  # the client hung up: the first send fails
        raise OSError("the client left")

    async def receive():
        return {"type": "http.disconnect"}

    with sdk(single_server) as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    response = AdmittedStream(events(), admission=admission, charge=Charge(None, UsageMeter(model=MODEL))).to_asgi_response(None, RequestFactory().get("/"))
    with pytest.raises(OSError):
        asyncio.run(response({"type": "http"}, receive, gone))
    assert not started
    assert (state.models[MODEL].num_in_flight_seqs, state.num_admitted_requests) == (0, 0)
    assert_serves(single_server)


def test_request_larger_than_the_queue_is_400(single_server):
    with sdk(single_server) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=2)
    sdk_error(info, status=400, code="invalid_value", param="n")
    assert_serves(single_server)


def test_draining_refuses_new_requests_and_finishes_running_ones(single_server):
    state = single_server.state
    with sdk(single_server) as client:
        stream, chunks = _open_stream(client, max_tokens=12)
        state.is_draining = True
        try:
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            sdk_error(info, status=503, code="service_unavailable", kind="service_unavailable")
            response = httpx.get(single_server.url + "/ready", timeout=60)
            assert (response.status_code, response.json()) == (503, {"status": "draining"})
            assert httpx.get(single_server.url + "/health", timeout=60).status_code == 200
            error_of(httpx.post(single_server.url + "/api/v1/generate", json={"prompt": "Hi"}, timeout=60),
                     status=503, code="service_unavailable", kind="service_unavailable")
            # The stream admitted before draining runs to its end.
            rest = list(chunks)
            assert rest[-1].choices[0].finish_reason == "length"
            assert sum(len(c.choices[0].delta.content or "") > 0 for c in rest) >= 1
        finally:
            state.is_draining = False
            stream.close()
    assert httpx.get(single_server.url + "/ready", timeout=60).status_code == 200
    assert_serves(single_server)


# -- 503: loading, failed to load, engine stopped --------------------------------------------------

SMALL_ENGINE = EngineConfig(max_model_len=512, max_num_seqs=2, max_num_batched_tokens=64,
                            kv_cache_memory=2 * 2**20)


def test_not_ready_while_loading_is_503(tiny_loaded):
    release = threading.Event()

    def load(startup) -> LLMEngine:
        release.wait()
        return LLMEngine(tiny_loaded, SMALL_ENGINE)

    server = LiveServer(ServerState(ServeConfig(), [ModelSpec(MODEL, load)])).start(wait_ready=False)
    try:
        response = httpx.get(server.url + "/ready", timeout=60)
        assert (response.status_code, response.json()) == (503, {"status": "loading"})
        response = httpx.get(server.url + "/health", timeout=60)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
        assert httpx.get(server.url + "/metrics", timeout=60).status_code == 200
        with sdk(server) as client:
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            error = sdk_error(info, status=503, code="service_unavailable", kind="service_unavailable")
            assert "loading" in error["message"]
            with pytest.raises(openai.InternalServerError):
                client.models.list()
        error_of(httpx.post(server.url + "/tokenize", json={"prompt": "Hi"}, timeout=60), status=503,
                 code="service_unavailable", kind="service_unavailable")
        release.set()
        wait_until(lambda: httpx.get(server.url + "/ready", timeout=60).status_code == 200, "ready after loading")
        response = httpx.post(server.url + "/tokenize", json={"prompt": "Hi"}, timeout=60)
        assert response.status_code == 200
        assert response.json()["tokens"] == tiny_loaded.tokenizer.encode("Hi")
    finally:
        release.set()
        server.stop()


def test_failed_load_is_503_on_ready_and_health():
    release = threading.Event()

    def load(startup) -> LLMEngine:
        # LiveServer.start waits for /health to answer 200: fail only after it has.
        release.wait()
        raise RuntimeError("no weights here")

    server = LiveServer(ServerState(ServeConfig(), [ModelSpec(MODEL, load)])).start(wait_ready=False)
    try:
        release.set()
        def settled():
            response = httpx.get(server.url + "/ready", timeout=60)
            return response if response.json()["status"] != "loading" else None

        response = wait_until(settled, "the load to fail")
        assert (response.status_code, response.json()) == (503, {"status": "failed"})
        response = httpx.get(server.url + "/health", timeout=60)
        assert (response.status_code, response.json()) == (503, {"status": "unhealthy"})
        with sdk(server) as client, pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        error = sdk_error(info, status=503, code="service_unavailable", kind="service_unavailable")
        assert "failed" in error["message"]
    finally:
        release.set()
        server.stop()


def test_engine_stopping_mid_stream_sends_an_error_event_then_done(tiny_loaded):
    server = start_server(tiny_loaded, engine_config=SMALL_ENGINE)
    try:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
            server.state.models[MODEL].engine.shutdown(timeout=30)
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert list(error) == ["error"] and set(error["error"]) == {"message", "type", "param", "code"}
        assert (error["error"]["code"], error["error"]["type"]) == ("service_unavailable", "service_unavailable")
        for event in events[:-2]:  # everything before it is an ordinary chunk, none of them final
            chunk = json.loads(event)
            assert chunk["object"] == "chat.completion.chunk"
            assert chunk["choices"][0]["finish_reason"] is None
        # A dead engine: not alive, not ready, and new requests get a 503.
        response = httpx.get(server.url + "/health", timeout=60)
        assert (response.status_code, response.json()) == (503, {"status": "unhealthy"})
        response = httpx.get(server.url + "/ready", timeout=60)
        assert (response.status_code, response.json()) == (503, {"status": "stopped"})
        with sdk(server) as client, pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        sdk_error(info, status=503, code="service_unavailable", kind="service_unavailable")
    finally:
        server.stop()


# -- CORS ----------------------------------------------------------------------------------------

def test_cors_allows_the_named_origins_only(tiny_loaded):
    server = start_server(tiny_loaded, api_keys=("k1",), allowed_origins=("https://app.example.com",))
    try:
        preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        answer = httpx.options(server.v1 + "/chat/completions", headers=preflight, timeout=60)
        assert answer.status_code in (200, 204)  # a preflight carries no key: answered before authentication
        assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        reply = httpx.post(server.v1 + "/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
                           headers={"Origin": "https://app.example.com", "Authorization": "Bearer k1"})
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "https://app.example.com"
        other = httpx.options(server.v1 + "/chat/completions", timeout=60,
                              headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()


# -- the operator's bounds on one request (serving.request_limits) --------------------------------

def test_the_operators_request_limits_are_400s_naming_the_flag(tiny_loaded):
    limits = RequestLimits(max_prompt_tokens=64, max_completion_tokens=4, max_n=2, max_logprobs=3)
    server = start_server(tiny_loaded, limits=limits)
    try:
        with sdk(server) as client:
            cases = [(dict(messages=[{"role": "user", "content": "word " * 80}]), "messages", "--max-prompt-tokens"),
                     (dict(max_tokens=5), "max_tokens", "--max-completion-tokens"),
                     (dict(max_completion_tokens=9), "max_completion_tokens", "--max-completion-tokens"),
                     (dict(n=3), "n", "--max-n"),
                     (dict(logprobs=True, top_logprobs=4), "top_logprobs", "--max-logprobs")]
            for fields, param, flag in cases:
                with pytest.raises(openai.BadRequestError) as info:
                    client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      **fields})
                error = sdk_error(info, status=400, code="invalid_value", param=param)
                assert flag in error["message"], error
            # An unset max_tokens is lowered to the bound, not refused; what fits is served.
            reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 4
            reply = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, n=2, logprobs=3)
            assert len(reply.choices) == 2
        error_of(httpx.post(server.url + "/api/v1/generate", json={"prompt": "Hi", "max_length": 5}, timeout=60),
                 status=400, code="invalid_value", param="max_length")
    finally:
        server.stop()
