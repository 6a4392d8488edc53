"""The OpenAI API as the official `openai` SDK sees it, against the live server.

Expected values come from the engine itself (`LLM` on the same tiny model)
and from the tokenizer: greedy text and token counts must match exactly.
Raw SSE lines are read where the SDK would hide the difference between an
absent field and a null one (`usage` on stream chunks).
"""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from tests.serving.conftest import ENGINE_CONFIG, MODEL

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The quick brown fox"
PROMPT_2 = "Once upon a time, in a land far away,"
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(live_server):
    with openai.OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_loaded):
    """The engine run directly, with the server's engine config."""
    llm = LLM(tiny_loaded, config=ENGINE_CONFIG)

    def run(prompt_ids: list[int], **params):
        return llm.generate([prompt_ids], SamplingParams(**params))[0]
    return run


@pytest.fixture(scope="module")
def tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


@pytest.fixture(scope="module")
def token_text(tokenizer):
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


def _raw_chunks(create, **body) -> list[dict]:
    """The JSON of each `data:` line of a streamed response, [DONE] checked and dropped."""
    with create.with_streaming_response.create(stream=True, **body) as response:
        data = [line[len("data:"):].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _counts(usage) -> tuple[int, int, int]:
    # Not the whole object: cached_tokens depends on what ran before.
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def _async_client(live_server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=120)


def _stop_in_the_middle(text: str) -> str:
    """A 3-character substring from the middle of `text`, found there first."""
    middle = len(text) // 2
    for k in sorted(range(1, len(text) - 3), key=lambda k: abs(k - middle)):
        stop = text[k:k + 3]
        if text.find(stop) == k and stop.strip() and "\ufffd" not in stop:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


# -- greedy output is the engine's ---------------------------------------------------------


def test_chat_greedy_matches_the_engine(client, reference, tokenizer, token_text):
    prompt_ids = tokenizer.encode_chat(CHAT)
    expected = reference(prompt_ids, **GREEDY, logprobs=0)
    response = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, **GREEDY)
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    want = expected.outputs[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert [e.token for e in choice.logprobs.content] == [token_text(t) for t in want.token_ids]
    assert choice.finish_reason == want.finish_reason
    assert response.usage.prompt_tokens == len(prompt_ids) == len(expected.prompt_ids)
    assert response.usage.completion_tokens == len(want.token_ids)
    assert response.usage.total_tokens == len(prompt_ids) + len(want.token_ids)


def test_completion_greedy_matches_the_engine(client, reference, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT)
    want = reference(prompt_ids, **GREEDY).outputs[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert response.object == "text_completion" and response.model == MODEL
    assert response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert choice.index == 0 and choice.text == want.text and choice.finish_reason == want.finish_reason
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(want.token_ids)
    assert response.usage.total_tokens == len(prompt_ids) + len(want.token_ids)


def test_completion_of_token_ids_matches_the_engine(client, reference, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT_2)
    want = reference(prompt_ids, **GREEDY).outputs[0]
    response = client.completions.create(model=MODEL, prompt=prompt_ids, **GREEDY)
    assert response.choices[0].text == want.text
    assert response.usage.prompt_tokens == len(prompt_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_answers_200_as_openai_does(client, stream):
    # Litestar answers a POST with 201 unless told otherwise; the SDK would not mind, curl scripts would.
    for create, body in ((client.chat.completions, {"messages": CHAT}), (client.completions, {"prompt": PROMPT})):
        with create.with_streaming_response.create(model=MODEL, max_tokens=2, stream=stream, **body) as response:
            assert response.status_code == 200
            (content_type,) = response.headers.get_list("content-type")
            assert content_type.startswith("text/event-stream" if stream else "application/json")


# -- streaming -------------------------------------------------------------------------------


def test_chat_stream_deltas_add_up_to_the_text(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_stream_deltas_add_up_to_the_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, stream=True, **GREEDY))
    assert all(c.object == "text_completion" and c.choices[0].index == 0 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_without_include_usage_has_no_usage(client, endpoint):
    create, body = ((client.chat.completions, {"messages": CHAT}) if endpoint == "chat"
                    else (client.completions, {"prompt": PROMPT}))
    chunks = _raw_chunks(create, model=MODEL, **body, **GREEDY)
    assert chunks and all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_include_usage_sends_a_last_chunk_with_the_usage(client, endpoint):
    create, body = ((client.chat.completions, {"messages": CHAT}) if endpoint == "chat"
                    else (client.completions, {"prompt": PROMPT}))
    whole = create.create(model=MODEL, **body, **GREEDY)
    chunks = _raw_chunks(create, model=MODEL, **body, **GREEDY, stream_options={"include_usage": True})
    *content, last = chunks
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == whole.usage.prompt_tokens
    assert last["usage"]["completion_tokens"] == whole.usage.completion_tokens
    assert last["usage"]["total_tokens"] == whole.usage.total_tokens
    assert content and all(c["choices"] and "usage" in c and c["usage"] is None for c in content)


def test_stream_options_without_stream_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  stream_options={"include_usage": True})
    assert caught.value.status_code == 400 and caught.value.param == "stream_options"


def test_sdk_stream_ends_with_the_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=5,
                                                 temperature=0, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


# -- n and several prompts ------------------------------------------------------------------


def test_chat_n2_gives_two_choices(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=6, seed=3,
                                              extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in response.choices)
    assert response.usage.completion_tokens == 12
    # One seed, yet two samples: each choice draws its own tokens.
    assert response.choices[0].message.content != response.choices[1].message.content


def test_chat_n2_stream_gives_both_indexes(client):
    chunks = _raw_chunks(client.chat.completions, model=MODEL, messages=CHAT, n=2, max_tokens=6, seed=3,
                         extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=6, seed=3,
                                           extra_body={"ignore_eos": True})
    texts, roles, reasons = {0: "", 1: ""}, [], []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        roles += [choice["index"]] if choice["delta"].get("role") == "assistant" else []
        reasons += [(choice["index"], choice["finish_reason"])] if choice["finish_reason"] else []
    assert sorted(roles) == [0, 1] and sorted(reasons) == [(0, "length"), (1, "length")]
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_completions_n2_gives_two_choices(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=6, seed=3,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 12


def test_two_prompts_times_n2_are_numbered_prompt_major(client, reference, tokenizer):
    # Greedy, so both choices of a prompt are that prompt's greedy text: the order shows in the text.
    params = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
    first, second = (reference(tokenizer.encode(p), **params).outputs[0].text for p in (PROMPT, PROMPT_2))
    assert first != second
    body = {"model": MODEL, "prompt": [PROMPT, PROMPT_2], "n": 2, "temperature": 0.0, "max_tokens": 6,
            "extra_body": {"ignore_eos": True}}
    response = client.completions.create(**body)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [first, first, second, second]
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) + len(tokenizer.encode(PROMPT_2))
    assert response.usage.completion_tokens == 4 * 6

    chunks = _raw_chunks(client.completions, **body, stream_options={"include_usage": True})
    texts = ["", "", "", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [first, first, second, second]
    assert chunks[-1]["usage"]["completion_tokens"] == response.usage.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == response.usage.prompt_tokens


# -- logprobs ---------------------------------------------------------------------------------


def test_chat_logprobs_have_openai_shape_and_engine_values(client, reference, tokenizer, token_text):
    want = reference(tokenizer.encode_chat(CHAT), **GREEDY, logprobs=3).outputs[0]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=3,
                                              **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == len(want.token_ids)
    for entry, lp in zip(content, want.logprobs):
        assert entry.token == token_text(lp.token_id)
        assert entry.bytes == list(tokenizer.token_bytes(lp.token_id))
        if "\ufffd" not in entry.token:  # a token that is part of a character has no text of its own
            assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert [t.token for t in entry.top_logprobs] == [token_text(i) for i, _ in lp.top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in lp.top], abs=1e-5)
        assert [t.bytes for t in entry.top_logprobs] == [list(tokenizer.token_bytes(i)) for i, _ in lp.top]
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs if "\ufffd" not in t.token)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token


def test_precision_level_gives_the_engine_s_exact_logprobs(client, reference, tokenizer):
    """`precision` (an extra body field): under HIGH the served logprobs are the engine's own
    run alone, bit for bit, whatever else the server runs (JSON floats round-trip exactly)."""
    want = reference(tokenizer.encode_chat(CHAT), **GREEDY, logprobs=2, precision="high").outputs[0]
    response = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2,
                                              extra_body={"precision": "high"}, **GREEDY)
    content = response.choices[0].logprobs.content
    assert [e.logprob for e in content] == [lp.logprob for lp in want.logprobs]
    assert [[t.logprob for t in e.top_logprobs] for e in content] == [[v for _, v in lp.top] for lp in want.logprobs]
    # The stability extension field: the engine's own measure of the same decisions.
    assert response.choices[0].stability == {"score": want.stability.score,
                                             "first_fragile_token": want.stability.first_fragile_token}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body={"precision": "max"})
    assert (info.value.status_code, info.value.param) == (400, "precision")


def test_every_choice_reports_its_stability(client):
    """An extension field on every choice, streamed on the chunk that finishes it."""
    reply = client.completions.create(model=MODEL, prompt=[PROMPT, PROMPT_2], n=2, max_tokens=6)
    for choice in reply.choices:
        assert 0 <= choice.stability["score"] <= 1
        fragile = choice.stability["first_fragile_token"]
        assert fragile is None or 0 <= fragile < 6
    finals = [c for c in _raw_chunks(client.chat.completions, model=MODEL, messages=CHAT, max_tokens=5)
              if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and 0 <= finals[0]["choices"][0]["stability"]["score"] <= 1


def test_chat_without_top_logprobs_has_empty_alternatives(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(e.top_logprobs == [] for e in content)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_have_openai_shape_and_engine_values(client, reference, tokenizer, token_text):
    want = reference(tokenizer.encode(PROMPT), **GREEDY, logprobs=2).outputs[0]
    response = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
    logprobs = response.choices[0].logprobs
    n = response.usage.completion_tokens
    assert n == len(want.token_ids)
    assert (len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
            == len(logprobs.text_offset) == n)
    assert logprobs.tokens == [token_text(t) for t in want.token_ids]
    assert logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    for top, lp in zip(logprobs.top_logprobs, want.logprobs):
        # A dict keyed by token text: the two alternatives, plus the chosen token if it is not one.
        keys = {token_text(i) for i, _ in lp.top} | {token_text(lp.token_id)}
        assert set(top) == keys and len(top) == len(keys)
    assert logprobs.text_offset[0] == 0
    assert [b - a for a, b in zip(logprobs.text_offset, logprobs.text_offset[1:])] == \
        [len(t) for t in logprobs.tokens[:-1]]


def test_streamed_logprobs_equal_the_whole_ones(client):
    body = {"model": MODEL, **GREEDY}
    whole = client.chat.completions.create(messages=CHAT, logprobs=True, top_logprobs=2, **body)
    streamed = [c.choices[0].logprobs.content
                for c in client.chat.completions.create(messages=CHAT, logprobs=True, top_logprobs=2,
                                                        stream=True, **body)
                if c.choices and c.choices[0].logprobs is not None]
    assert [e for content in streamed for e in content] == whole.choices[0].logprobs.content

    whole = client.completions.create(prompt=PROMPT, logprobs=2, **body).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(prompt=PROMPT, logprobs=2, stream=True,
                                                                       **body)
             if c.choices[0].logprobs is not None]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in parts for x in getattr(part, field)] == getattr(whole, field), field


# -- seeds -----------------------------------------------------------------------------------


def test_same_seed_same_text_different_seeds_differ(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=8,
                                              seed=seed, extra_body={"ignore_eos": True}
                                              ).choices[0].message.content
    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1235), sample(1236)}) == 3


def test_seeded_requests_in_one_batch_match_one_alone(client, live_server):
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 1.0, "max_tokens": 8, "seed": 99,
            "extra_body": {"ignore_eos": True}}
    alone = client.completions.create(**body).choices[0].text

    async def together():
        async with _async_client(live_server) as aclient:
            responses = await asyncio.gather(*(aclient.completions.create(**body) for _ in range(3)),
                                             aclient.completions.create(**{**body, "seed": 100}))
        return [r.choices[0].text for r in responses]
    *same, other = asyncio.run(together())
    assert same == [alone] * 3 and other != alone


# -- finish reasons and stops ------------------------------------------------------------------


def test_max_tokens_finishes_with_length(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4


def test_chat_stop_string_ends_the_text_before_it(client):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0.0, "max_tokens": 16,
            "extra_body": {"ignore_eos": True}}
    free = client.chat.completions.create(**body)
    text = free.choices[0].message.content
    stop = _stop_in_the_middle(text)
    stopped = client.chat.completions.create(**body, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.find(stop)]
    assert stopped.usage.completion_tokens < free.usage.completion_tokens
    chunks = list(client.chat.completions.create(**body, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stop_string_ends_the_text_before_it(client):
    body = {"model": MODEL, "prompt": PROMPT_2, "temperature": 0.0, "max_tokens": 16,
            "extra_body": {"ignore_eos": True}}
    text = client.completions.create(**body).choices[0].text
    stop = _stop_in_the_middle(text)
    stopped = client.completions.create(**body, stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.find(stop)]
    chunks = list(client.completions.create(**body, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_completion_tokens_works_like_max_tokens(client):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    newer = client.chat.completions.create(**body, max_completion_tokens=5)
    older = client.chat.completions.create(**body, max_tokens=5)
    assert newer.choices[0].finish_reason == "length" and newer.usage.completion_tokens == 5
    assert newer.choices[0].message.content == older.choices[0].message.content
    assert _counts(newer.usage) == _counts(older.usage)


# -- echo ------------------------------------------------------------------------------------


def test_echo_puts_the_prompt_in_front(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert _counts(echoed.usage) == _counts(plain.usage)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_echo_with_max_tokens_0_gives_only_the_prompt(client, tokenizer, token_text):
    prompt_ids = tokenizer.encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    (choice,) = response.choices
    assert choice.text == PROMPT
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [token_text(t) for t in prompt_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in choice.logprobs.token_logprobs[1:])
    assert len(choice.logprobs.text_offset) == len(prompt_ids)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT


def test_echo_logprobs_cover_prompt_and_completion(client, tokenizer):
    num_prompt = len(tokenizer.encode(PROMPT))
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         logprobs=1, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == num_prompt + 4
    assert "".join(logprobs.tokens).startswith(PROMPT)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True,
        extra_body={"ignore_eos": True}) if c.choices[0].logprobs is not None]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for part in streamed for x in getattr(part, field)] == getattr(logprobs, field), field


# -- chat template flags ---------------------------------------------------------------------


def test_add_generation_prompt_false(client, reference, tokenizer):
    prompt_ids = tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert len(prompt_ids) != len(tokenizer.encode_chat(CHAT))
    response = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY,
                                              extra_body={"add_generation_prompt": False})
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].message.content == reference(prompt_ids, **GREEDY).outputs[0].text


def test_continue_final_message(client, reference, tokenizer):
    messages = CHAT + [{"role": "assistant", "content": "Red, orange and"}]
    prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert len(prompt_ids) != len(tokenizer.encode_chat(messages, add_generation_prompt=False))
    response = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY,
                                              extra_body={"continue_final_message": True,
                                                          "add_generation_prompt": False})
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].message.content == reference(prompt_ids, **GREEDY).outputs[0].text


# -- vLLM's extras through extra_body -----------------------------------------------------------


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_are_greedy(client, extra):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    greedy = client.completions.create(**body, temperature=0).choices[0].text
    sampled = client.completions.create(**body, temperature=1.0, seed=5).choices[0].text
    assert sampled != greedy  # so the extra below is what makes it greedy
    narrowed = client.completions.create(**{**body, "extra_body": {"ignore_eos": True, **extra}},
                                         temperature=1.0, seed=5)
    assert narrowed.choices[0].text == greedy


def test_repetition_penalty_matches_the_engine(client, reference, tokenizer):
    # Below 1 the penalty favours tokens already seen: a random model's greedy
    # output rarely repeats one, so a penalty above 1 would change nothing.
    prompt_ids = tokenizer.encode(PROMPT_2)
    plain = reference(prompt_ids, temperature=0.0, max_tokens=12).outputs[0].text
    want = reference(prompt_ids, temperature=0.0, max_tokens=12, repetition_penalty=0.05).outputs[0].text
    assert want != plain  # the penalty changes this output
    response = client.completions.create(model=MODEL, prompt=PROMPT_2, temperature=0, max_tokens=12,
                                         extra_body={"repetition_penalty": 0.05})
    assert response.choices[0].text == want


def test_ignore_eos_and_min_tokens_hold_off_a_forced_eos(client, tokenizer):
    eos = tokenizer.eos_token_id
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "logit_bias": {str(eos): 100}}
    forced = client.completions.create(**body)
    assert forced.choices[0].finish_reason == "stop" and forced.usage.completion_tokens == 1
    assert forced.choices[0].text == ""  # EOS is a special token: not in the text
    ignored = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 6
    # As in vLLM, EOS is banned until min_tokens tokens are out; then it comes at once.
    held = client.completions.create(**body, extra_body={"min_tokens": 3})
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 3 + 1
    assert held.choices[0].text


def test_min_tokens_outlasts_a_stop_string(client, reference, tokenizer):
    prompt_ids = tokenizer.encode(PROMPT_2)
    free = reference(prompt_ids, temperature=0.0, max_tokens=16, ignore_eos=True).outputs[0]
    stop = free.text[:2]  # met within the first tokens
    body = {"model": MODEL, "prompt": PROMPT_2, "temperature": 0, "max_tokens": 16, "stop": [stop]}
    early = client.completions.create(**body, extra_body={"ignore_eos": True})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens < 6
    held = client.completions.create(**body, extra_body={"ignore_eos": True, "min_tokens": 6})
    assert held.usage.completion_tokens >= 6
    want = reference(prompt_ids, temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=6)
    assert held.choices[0].text == want.outputs[0].text


# -- the async client --------------------------------------------------------------------------


def test_async_client_matches_the_sync_one(client, live_server):
    whole_chat = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    whole_text = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)

    async def run():
        async with _async_client(live_server) as aclient:
            async def streamed_chat():
                stream = await aclient.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                               stream_options={"include_usage": True},
                                                               **GREEDY)
                chunks = [c async for c in stream]
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
            return await asyncio.gather(aclient.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY),
                                        aclient.completions.create(model=MODEL, prompt=PROMPT, **GREEDY),
                                        streamed_chat())
    chat, text, (streamed, streamed_usage) = asyncio.run(run())
    assert chat.choices[0].message.content == whole_chat.choices[0].message.content == streamed
    assert _counts(chat.usage) == _counts(whole_chat.usage) == _counts(streamed_usage)
    assert text.choices[0].text == whole_text.choices[0].text
    assert _counts(text.usage) == _counts(whole_text.usage)


def test_chat_logprob_bytes_of_split_characters_join_into_the_text(client, tokenizer):
    # "日本" is three tokens, the first two only parts of UTF-8 characters. Force
    # each as a one-token answer: its bytes are its own, and they join into the text.
    ids = tokenizer.encode("日本", add_special_tokens=False)
    assert len(ids) == 3
    responses = [client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0,
                                                logprobs=True, logit_bias={str(token_id): 100})
                 for token_id in ids]
    joined = b"".join(bytes(r.choices[0].logprobs.content[0].bytes) for r in responses)
    assert joined.decode("utf-8") == "日本"
    assert "\ufffd" in responses[0].choices[0].logprobs.content[0].token  # no text of its own
