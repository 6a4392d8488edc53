"""`balansis run-batch` on a tiny random model with SmolLM2's tokenizer, and on the
real all-MiniLM-L6-v2 encoder for embeddings: OpenAI batch lines in, OpenAI
result lines out, each input line exactly once, even across a SIGKILL."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoints.encoder_dir import load_encoder
from engine.embedder import Embedder
from engine.engine_args import engine_config_from_args
from engine.llm import LLM
from engine.llm_engine import EngineConfig
from engine.sampling import SamplingParams
from model.pooling import PoolingMode
from serving import cli, schemas
from serving.batch_jobs import add_arguments, run_batch, run_batch_command
from serving.errors import RequestError, decode_body
from serving.openai_requests import parse_chat

# One engine shape for every test here and for the CLI runs, so few programs compile.
ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=32, max_model_len=128)
# No persistent compilation cache: enabling it in this process would change JAX's config for every later test.
ENGINE_FLAGS = ["--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--max-model-len", "128",
                "--no-compilation-cache"]
WORDS = ["apple", "river", "quantum", "blue", "seven", "castle", "piano", "orbit", "lemon", "storm"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llm(tiny_loaded):
    return LLM(tiny_loaded, config=EngineConfig(**ENGINE))


def _text(i: int) -> str:
    return " ".join(WORDS[(i + j) % len(WORDS)] for j in range(i % 6 + 2))


def _line(custom_id, body, url="/v1/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _completion(i, **fields):
    return _line(f"c{i}", {"model": "anything", "prompt": _text(i), "max_tokens": 4, "temperature": 0, **fields})


def _chat(i, **fields):
    return _line(f"m{i}", {"model": "anything", "messages": [{"role": "user", "content": _text(i)}],
                           "max_tokens": 4, "temperature": 0, **fields}, url="/v1/chat/completions")


def _run(llm, tmp_path, lines, name="in.jsonl", **kwargs):
    source, results = tmp_path / name, tmp_path / f"{name}.out"
    source.write_text("".join(line + "\n" for line in lines))
    summary = run_batch(llm, input_path=source, output_path=results, show_progress=False, **kwargs)
    return summary, _read(results)


def _read(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _bodies(records) -> dict[str, dict]:
    return {r["custom_id"]: r["response"]["body"] for r in records if r["error"] is None}


def test_hundred_lines_four_malformed_each_accounted_once(llm, tmp_path):
    lines = [_chat(i) if i % 3 == 0 else _completion(i) for i in range(100)]
    lines[9] = '{"custom_id": "broken", "method": "POST", '  # line 10: not JSON
    lines[49] = json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}})  # line 50
    lines[69] = '{"custom_id": "deep", "body": ' + "[" * 1000 + "]" * 1000 + "}"  # line 70: past the decoder's depth
    lines[89] = _line("c89", {"input": "x"}, url="/v1/moderations")  # line 90
    summary, records = _run(llm, tmp_path, lines)

    assert (summary.num_results, summary.num_errors, summary.num_skipped) == (96, 4, 0)
    assert len(records) == 100
    ok = [r for r in records if r["error"] is None]
    errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    expected_ids = {json.loads(line)["custom_id"] for i, line in enumerate(lines) if i not in (9, 49, 69, 89)}
    assert sorted(r["custom_id"] for r in ok) == sorted(expected_ids)  # each exactly once
    assert all(r["response"]["status_code"] == 200 and r["id"].startswith("batch_req_") for r in ok)
    assert sorted(errors) == [10, 50, 70, 90]
    assert [errors[n]["error"]["code"] for n in (10, 50, 70, 90)] == [
        "invalid_json", "missing_custom_id", "invalid_json", "invalid_url"]
    assert [errors[n]["custom_id"] for n in (10, 50, 70, 90)] == [None, None, None, "c89"]
    assert all(errors[n]["response"] is None for n in (10, 50, 70, 90))
    assert "/v1/embeddings" in errors[90]["error"]["message"]  # the urls we serve are listed


def test_greedy_completion_equals_llm_generate_and_usage_counts(llm, tmp_path):
    prompt = "The quick brown fox jumps over"
    _, records = _run(llm, tmp_path, [
        _line("one", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}),
        _line("ids", {"prompt": llm.tokenizer.encode(prompt), "max_tokens": 8, "temperature": 0,
                      "ignore_eos": True}),
        _line("two", {"prompt": [prompt], "max_tokens": 8, "temperature": 0, "n": 2, "ignore_eos": True})])
    expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    bodies = _bodies(records)
    num_prompt = len(llm.tokenizer.encode(prompt))
    for custom_id, num_choices in (("one", 1), ("ids", 1), ("two", 2)):
        body = bodies[custom_id]
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == llm.engine.loaded.path.name  # the served name, not the asked one
        assert [c["text"] for c in body["choices"]] == [expected.outputs[0].text] * num_choices
        assert [c["index"] for c in body["choices"]] == list(range(num_choices))
        assert [c["finish_reason"] for c in body["choices"]] == ["length"] * num_choices
        assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 8 * num_choices,
                                 "total_tokens": num_prompt + 8 * num_choices,
                                 "prompt_tokens_details": body["usage"]["prompt_tokens_details"]}


def test_chat_lines_use_the_chat_template(llm, tmp_path):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    _, records = _run(llm, tmp_path, [
        _line("chat", {"messages": messages, "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True},
              url="/v1/chat/completions"),
        # Text parts and the developer role are the same conversation.
        _line("parts", {"messages": [{"role": "developer", "content": [{"type": "text", "text": "You are terse."}]},
                                     messages[1]], "max_tokens": 6, "temperature": 0, "ignore_eos": True},
              url="/v1/chat/completions")])
    expected = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    num_prompt = len(llm.tokenizer.encode_chat(messages))
    for body in _bodies(records).values():
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": expected.outputs[0].text, "refusal": None}
        assert choice["logprobs"] is None
        assert body["usage"]["prompt_tokens"] == num_prompt
        assert body["usage"]["completion_tokens"] == 6


def test_logprobs_echo_logit_bias_and_stop(llm, tmp_path):
    prompt = "Seven castles by the river"
    bias_token = llm.tokenizer.encode(" piano")[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    _, records = _run(llm, tmp_path, [
        _chat(1, logprobs=True, top_logprobs=3),
        _line("echo", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2,
                       "ignore_eos": True}),
        _line("score", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}),
        _line("bias", {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logit_bias": {str(bias_token): 100}}),
        _line("stop", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop": [stop]})])
    bodies = _bodies(records)
    num_prompt = len(llm.tokenizer.encode(prompt))

    chat = bodies["m1"]["choices"][0]["logprobs"]["content"]
    assert len(chat) == bodies["m1"]["usage"]["completion_tokens"]
    for entry in chat:  # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["bytes"] == list(entry["token"].encode())

    echo = bodies["echo"]["choices"][0]
    assert echo["text"].startswith(prompt) and len(echo["text"]) > len(prompt)
    logprobs = echo["logprobs"]
    assert len(logprobs["tokens"]) == num_prompt + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) for lp in logprobs["token_logprobs"][1:])
    assert all(2 <= len(top) <= 3 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]

    score = bodies["score"]
    assert score["choices"][0]["text"] == prompt
    assert len(score["choices"][0]["logprobs"]["tokens"]) == num_prompt
    assert score["usage"]["completion_tokens"] == 0

    assert bodies["bias"]["choices"][0]["text"] == llm.tokenizer.decode([bias_token] * 4)
    assert bodies["stop"]["choices"][0]["text"] == greedy[:greedy.index(stop)]
    assert bodies["stop"]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_get_error_lines_naming_the_parameter(llm, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lines = [
        _line("tools", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "/v1/chat/completions"),
        _line("json", {**chat, "response_format": {"type": "json_object"}}, "/v1/chat/completions"),
        _line("stream", {**chat, "stream": True}, "/v1/chat/completions"),
        _line("image", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
              "/v1/chat/completions"),
        _line("temp", {"prompt": "hi", "temperature": -1}),
        _line("unknown", {"prompt": "hi", "frobnicate": 1}),
        _line("bias", {"prompt": "hi", "logit_bias": {"nope": 1}}),
        _line("long-ask", {"prompt": "hi", "max_tokens": 1000}),
        _line("long-prompt", {"prompt": " ".join(WORDS * 20)}),
        _line("two-prompts", {"prompt": ["a", "b"]}),
        _line("no-body", None),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "hi"}}),
        _line("fine", {"prompt": "hi", "max_tokens": 2}),
        _line("fine", {"prompt": "again", "max_tokens": 2}),
    ]
    summary, records = _run(llm, tmp_path, lines)
    assert (summary.num_results, summary.num_errors) == (1, 13)
    by_line = {r["error"]["line"]: r for r in records if r["error"]}
    expected = {  # line: (custom_id, code, param, has a 400 response)
        1: ("tools", "unsupported_parameter", "tools", True),
        2: ("json", "unsupported_parameter", "response_format", True),
        3: ("stream", "unsupported_parameter", "stream", True),
        4: ("image", "unsupported_parameter", "messages[0].content", True),
        5: ("temp", "invalid_value", "temperature", True),
        6: ("unknown", "unknown_parameter", "frobnicate", True),
        7: ("bias", "invalid_value", "logit_bias", True),
        8: ("long-ask", "context_length_exceeded", "max_tokens", True),
        9: ("long-prompt", "context_length_exceeded", "prompt", True),
        10: ("two-prompts", "invalid_value", "prompt", True),
        11: ("no-body", "invalid_value", None, True),
        12: ("get", "invalid_method", "method", False),
        14: ("fine", "duplicate_custom_id", "custom_id", False),
    }
    assert sorted(by_line) == sorted(expected)
    for number, (custom_id, code, param, has_response) in expected.items():
        record = by_line[number]
        assert (record["custom_id"], record["error"]["code"], record["error"]["param"]) == (custom_id, code, param)
        if has_response:
            assert record["response"]["status_code"] == 400
            assert record["response"]["body"]["error"]["param"] == param
            assert record["response"]["body"]["error"]["type"] == "invalid_request_error"
        else:
            assert record["response"] is None


@pytest.mark.parametrize("damage", ["torn", "garbage"])
def test_a_broken_last_line_is_cut_and_rerun(llm, tmp_path, damage):
    lines = [_completion(i) for i in range(5)]
    _, records = _run(llm, tmp_path, lines)
    results = tmp_path / "in.jsonl.out"
    text = results.read_text()
    last = text.splitlines()[-1]
    kept = text[:len(text) - len(last) - 1]
    results.write_text(kept + (last[:len(last) // 2] if damage == "torn" else "{not json\n"))
    summary, rerun = _run(llm, tmp_path, lines)
    assert (summary.num_results, summary.num_skipped) == (1, 4)
    assert sorted(r["custom_id"] for r in rerun) == [f"c{i}" for i in range(5)]
    assert _bodies(rerun)[json.loads(last)["custom_id"]]["choices"] == json.loads(last)["response"]["body"]["choices"]


def test_a_corrupt_middle_line_stops_the_run(llm, tmp_path):
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(_completion(0) + "\n")
    results.write_text('{"custom_id": "c9"}\nnot json\n{"custom_id": "c8"}\n')
    with pytest.raises(ValueError, match="line 2"):
        run_batch(llm, input_path=source, output_path=results, show_progress=False)


def _cli_args(*argv) -> list[str]:
    return [sys.executable, "-c",
            "import argparse, sys\n"
            "from serving.batch_jobs import add_arguments, run_batch_command\n"
            "parser = argparse.ArgumentParser(prog='balansis run-batch')\n"
            "add_arguments(parser)\n"
            "sys.exit(run_batch_command(parser.parse_args(sys.argv[1:])))\n", *argv]


@pytest.fixture(scope="module")
def model_folder(tiny_loaded, tmp_path_factory):
    """tiny_loaded as a model folder a subprocess can load: its weights plus the tokenizer."""
    from checkpoints.loader import load_model

    folder = tmp_path_factory.mktemp("tiny-model")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_loaded.path / name, folder / name)
    tiny_loaded.tokenizer._hf.save_pretrained(folder)
    loaded = load_model(folder)
    assert loaded.config == tiny_loaded.config and loaded.tokenizer.chat_template
    return folder


def test_sigkill_midway_then_rerun_gives_each_line_once(llm, tmp_path, model_folder, capsys):
    lines = [_chat(i, max_tokens=16, ignore_eos=True) if i % 2 else _completion(i, max_tokens=16, ignore_eos=True)
             for i in range(24)]
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    argv = ["-i", str(source), "-o", str(results), "--model", str(model_folder), *ENGINE_FLAGS]

    first = subprocess.Popen(_cli_args(*argv), cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (results.exists() and results.read_bytes().count(b"\n") >= 2):
        assert first.poll() is None, first.stderr.read().decode()
        assert time.monotonic() < deadline, "no results from the first run"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    num_before = results.read_bytes().count(b"\n")
    assert first.returncode == -signal.SIGKILL and num_before < len(lines)

    # The rerun goes through the same handler in this process, which has
    # the engine's programs compiled already.
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_batch_command(parser.parse_args([*argv, "--no-progress"])) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"{len(lines) - num_before} results, 0 errors, {num_before} already done"), summary
    records = _read(results)
    assert sorted(r["custom_id"] for r in records) == sorted(f"{'m' if i % 2 else 'c'}{i}" for i in range(24))
    assert all(r["error"] is None for r in records)
    # Same weights in both processes: the CLI's greedy answers are the in-process ones.
    bodies = _bodies(records)
    expected = llm.generate([_text(0), _text(2)], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert [bodies["c0"]["choices"][0]["text"], bodies["c2"]["choices"][0]["text"]] == \
        [o.outputs[0].text for o in expected]


def test_command_flags_map_onto_the_engine_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["-i", "a", "-o", "b", "--max-num-seqs", "8", "--kv-cache-memory", "0.5",
                              "--no-prefix-caching", "--served-model-name", "m", "--max-in-flight", "3",
                              "--embedding-pooling", "mean"])
    assert (args.input_file, args.output_file, args.served_model_name, args.max_in_flight,
            args.embedding_pooling) == (Path("a"), Path("b"), "m", 3, "mean")
    assert parser.parse_args(["-i", "a", "-o", "b"]).embedding_pooling is None  # last, for a decoder
    config = engine_config_from_args(args)
    assert (config.max_num_seqs, config.kv_cache_memory, config.enable_prefix_caching) == (8, 0.5, False)
    with pytest.raises(ValueError, match="no such file"):
        run_batch_command(parser.parse_args(["-i", "/nonexistent/in.jsonl", "-o", "b"]))


@pytest.mark.parametrize("body, param, code", [
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "invalid_value"),
])
def test_chat_body_errors(body, param, code):
    with pytest.raises(RequestError) as e:
        parse_chat(decode_body(body, schemas.ChatCompletionRequest))
    assert (e.value.param, e.value.code) == (param, code)


def test_neutral_values_of_unsupported_fields_are_accepted():
    request = parse_chat(decode_body({
        "messages": [{"role": "user", "content": "x"}], "tools": None, "tool_choice": "none",
        "response_format": {"type": "text"}, "stream": False, "user": "u", "logit_bias": {"5": -100},
        "top_k": -1, "max_completion_tokens": 7, "max_tokens": 3}, schemas.ChatCompletionRequest))
    assert request.sampling == {"logit_bias": {5: -100}}
    assert (request.max_tokens, request.max_tokens_param, request.num_logprobs) == (7, "max_completion_tokens", None)


def test_bodies_validate_against_the_openai_sdk_types(llm, tmp_path):
    types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion

    _, records = _run(llm, tmp_path, [_chat(0, logprobs=True, top_logprobs=2), _completion(1, logprobs=2),
                                      _completion(2, echo=True, n=2)])
    bodies = _bodies(records)
    ChatCompletion.model_validate(bodies["m0"], strict=True)
    # (The SDK's types leave out the null logprob of an echoed prompt's first token, which the API sends.)
    for custom_id in ("c1", "c2"):
        types.Completion.model_validate(bodies[custom_id], strict=True)


# -- /v1/embeddings lines ------------------------------------------------------------------

SENTENCES = ["The cat sat on the mat.", "Stock markets fell sharply today.",
             "A quiet river runs through the valley."]


@pytest.fixture(scope="module")
def minilm(minilm_folder):
    return Embedder.for_encoder(load_encoder(minilm_folder))


def _embeddings(custom_id, value, **fields):
    return _line(custom_id, {"model": "anything", "input": value, **fields}, url="/v1/embeddings")


def _vectors(body) -> np.ndarray:
    """An embeddings body's vectors, float or base64 (little-endian float32, as the SDKs decode)."""
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
                     else d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], np.float32)


def _count_embed_calls(monkeypatch) -> list[int]:
    """Record how many inputs each real Embedder.embed call gets (the call itself runs unchanged)."""
    calls: list[int] = []
    embed = Embedder.embed

    def counted(self, token_ids, **kwargs):
        calls.append(len(token_ids))
        return embed(self, token_ids, **kwargs)

    monkeypatch.setattr(Embedder, "embed", counted)
    return calls


def test_encoder_lines_of_each_input_form_are_embedded_together(minilm, tmp_path, monkeypatch):
    ids = minilm.encode(SENTENCES)
    inputs = {  # custom_id: (the body's input, its token ids)
        "text": (SENTENCES[0], ids[:1]),
        "texts": (SENTENCES[1:], ids[1:]),
        "ids": (ids[2], ids[2:]),
        "id-lists": (ids[:2], ids[:2]),
        "base64": (SENTENCES, ids),
    }
    lines = [_embeddings(custom_id, value, **({"encoding_format": "base64"} if custom_id == "base64" else {}))
             for custom_id, (value, _) in inputs.items()]
    expected = {custom_id: minilm.embed(rows) for custom_id, (_, rows) in inputs.items()}  # each line alone
    calls = _count_embed_calls(monkeypatch)
    summary, records = _run(minilm, tmp_path, lines, served_model_name="minilm")

    assert (summary.num_results, summary.num_errors) == (5, 0)
    assert calls == [sum(len(rows) for _, rows in inputs.values())]  # one call for the whole pass
    assert sorted(r["custom_id"] for r in records) == sorted(inputs)
    bodies = _bodies(records)
    for custom_id, (_, rows) in inputs.items():
        body = bodies[custom_id]
        num_tokens = sum(map(len, rows))
        assert (body["object"], body["model"]) == ("list", "minilm")
        assert [d["index"] for d in body["data"]] == list(range(len(rows)))
        assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
        np.testing.assert_allclose(_vectors(body), expected[custom_id], atol=1e-6)
    assert all(isinstance(d["embedding"], str) for d in bodies["base64"]["data"])

    # Pending lines count toward max_in_flight: two lines a pass, three embed calls.
    calls.clear()
    summary, _ = _run(minilm, tmp_path, lines, name="paced.jsonl", served_model_name="minilm", max_in_flight=2)
    assert summary.num_results == 5 and calls == [1 + 2, 1 + 2, 3]


def test_encoder_error_lines(minilm, tmp_path):
    long = "word " * 400
    lines = [_embeddings("long", long), _embeddings("cut", long, truncate_prompt_tokens=-1), _chat(0),
             _completion(1), _embeddings("dims", "hi", dimensions=128), _embeddings("empty", [])]
    summary, records = _run(minilm, tmp_path, lines, served_model_name="minilm")

    assert (summary.num_results, summary.num_errors) == (1, 5)
    by_id = {r["custom_id"]: r for r in records}
    cut = by_id["cut"]["response"]
    assert cut["status_code"] == 200 and cut["body"]["usage"]["prompt_tokens"] == minilm.max_length
    assert _vectors(cut["body"]).shape == (1, minilm.dimensions)
    for custom_id, code, param in [("long", "context_length_exceeded", "input"), ("m0", "model_not_supported", None),
                                   ("c1", "model_not_supported", None), ("dims", "invalid_value", "dimensions"),
                                   ("empty", "invalid_value", "input")]:
        record = by_id[custom_id]
        assert (record["error"]["code"], record["error"]["param"]) == (code, param), custom_id
        assert record["response"]["status_code"] == 400
        assert record["response"]["body"]["error"]["code"] == code
    assert "serves /v1/embeddings only" in by_id["m0"]["error"]["message"]
    with pytest.raises(ValueError, match="served_model_name"):
        run_batch(minilm, input_path=tmp_path / "in.jsonl", output_path=tmp_path / "x.jsonl")


@pytest.mark.parametrize("pooling", [PoolingMode.LAST, PoolingMode.MEAN])
def test_a_decoder_answers_chat_and_embeddings_lines_in_one_file(llm, tiny_loaded, tmp_path, monkeypatch, pooling):
    texts = [_text(i) for i in range(4)]
    token_ids = [llm.tokenizer.encode(t) for t in texts]
    expected = Embedder.for_decoder(tiny_loaded, pooling=pooling).embed(token_ids)
    lines = [_chat(0), _embeddings("e-text", texts[0]), _completion(1), _embeddings("e-texts", texts[1:3]),
             _embeddings("e-ids", token_ids[3])]
    calls = _count_embed_calls(monkeypatch)
    summary, records = _run(llm, tmp_path, lines, max_in_flight=8, embedding_pooling=pooling)

    assert (summary.num_results, summary.num_errors) == (5, 0)
    assert calls == [4]
    bodies = _bodies(records)
    assert (bodies["m0"]["object"], bodies["c1"]["object"]) == ("chat.completion", "text_completion")
    vectors = np.concatenate([_vectors(bodies[custom_id]) for custom_id in ("e-text", "e-texts", "e-ids")])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert bodies["e-texts"]["usage"]["prompt_tokens"] == len(token_ids[1]) + len(token_ids[2])
    assert bodies["e-ids"]["model"] == llm.engine.loaded.path.name


def test_a_rerun_appends_nothing_for_embeddings_lines_already_done(minilm, tmp_path):
    lines = [_embeddings(f"e{i}", SENTENCES[i % 3]) for i in range(6)] + [_embeddings("long", "word " * 400)]
    _run(minilm, tmp_path, lines, served_model_name="minilm", max_in_flight=3)
    results = tmp_path / "in.jsonl.out"
    # As if killed after the first few lines were written.
    kept = results.read_text().splitlines(keepends=True)[:3]
    results.write_text("".join(kept))

    summary, records = _run(minilm, tmp_path, lines, served_model_name="minilm", max_in_flight=3)
    assert summary.num_skipped == 3 and summary.num_results + summary.num_errors == 4
    assert sorted(r["custom_id"] for r in records) == sorted(json.loads(line)["custom_id"] for line in lines)
    before = results.read_bytes()
    summary, _ = _run(minilm, tmp_path, lines, served_model_name="minilm")
    assert (summary.num_results, summary.num_errors, summary.num_skipped) == (0, 0, 7)
    assert results.read_bytes() == before


def test_the_command_runs_an_encoder_folder(minilm, minilm_folder, tmp_path, capsys):
    source, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(_embeddings("a", SENTENCES[0]) + "\n" + _chat(0) + "\n")
    argv = ["run-batch", "-i", str(source), "-o", str(results), "--model", str(minilm_folder), "--no-progress"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.startswith("1 results, 1 errors, 0 already done")
    records = {r["custom_id"]: r for r in _read(results)}
    body = records["a"]["response"]["body"]
    assert body["model"] == minilm_folder.name
    np.testing.assert_allclose(_vectors(body), minilm.embed(minilm.encode(SENTENCES[:1])), atol=1e-6)
    assert records["m0"]["error"]["code"] == "model_not_supported"

    assert cli.main([*argv, "--embedding-pooling", "mean"]) == 2  # a decoder's flag
    assert "--embedding-pooling is for decoder models" in capsys.readouterr().err
