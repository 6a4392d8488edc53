"""Anthropic's Messages API through the official `anthropic` SDK on a live server (the tiny model):
whole and streamed messages, system prompts, stop sequences, token counts, Anthropic-shaped
errors, and x-api-key authentication."""

from __future__ import annotations

import anthropic
import pytest

from tests.serving.conftest import MODEL, start_server


@pytest.fixture(scope="module")
def client(live_server):
    with anthropic.Anthropic(base_url=live_server.url, api_key="unused", max_retries=0) as client:
        yield client


MESSAGES = [{"role": "user", "content": "Say something."}]


def test_a_message(client):
    message = client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES, system="You are brief.",
                                     extra_body={"temperature": 0})
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_") and message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 12 and message.usage.input_tokens > 0
    count = client.messages.count_tokens(model=MODEL, messages=MESSAGES, system="You are brief.")
    assert count.input_tokens == message.usage.input_tokens


def test_a_streamed_message_equals_the_whole_one(client):
    body = dict(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}], extra_body={"temperature": 0})
    whole = client.messages.create(**body)
    with client.messages.stream(**body) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events


def test_stop_sequences_and_max_tokens(client):
    long = client.messages.create(model=MODEL, max_tokens=40, messages=MESSAGES, extra_body={"temperature": 0})
    text = long.content[0].text
    word = next((w for w in text.split()[2:] if w.isalpha()), None)
    if word is not None:
        stopped = client.messages.create(model=MODEL, max_tokens=40, messages=MESSAGES, stop_sequences=[word],
                                         extra_body={"temperature": 0})
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
        assert word not in stopped.content[0].text
    short = client.messages.create(model=MODEL, max_tokens=1, messages=MESSAGES, extra_body={"temperature": 0})
    assert short.stop_reason in ("max_tokens", "end_turn") and short.usage.output_tokens == 1


@pytest.mark.parametrize("body, status, kind", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "invalid_request_error"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, 400, "invalid_request_error"),
    ({"model": "no-such-model"}, 404, "not_found_error"),
    ({"extra_body": {"temperature": -1}}, 400, "invalid_request_error"),
    ({"output_config": {"effort": "high"}}, 400, "invalid_request_error"),
])
def test_errors_are_anthropic_shaped(client, body, status, kind):
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": MESSAGES, **body})
    assert info.value.status_code == status
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == kind


def test_x_api_key_authenticates(tiny_loaded):
    server = start_server(tiny_loaded, api_keys=("sk-static-anthropic-test",))
    try:
        ok = anthropic.Anthropic(base_url=server.url, api_key="sk-static-anthropic-test", max_retries=0)
        assert ok.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES).usage.output_tokens >= 1
        bad = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            bad.messages.create(model=MODEL, max_tokens=2, messages=MESSAGES)
        assert info.value.body["error"]["type"] == "authentication_error"
    finally:
        server.stop()
