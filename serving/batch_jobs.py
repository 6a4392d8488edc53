"""`balansis run-batch`: an OpenAI Batch API file through the engine, offline.

    balansis run-batch -i requests.jsonl -o results.jsonl [--model PATH] [--max-num-seqs 64]

Input, one request a line, as OpenAI's Batch API takes it:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

`url` is /v1/chat/completions, /v1/completions or /v1/embeddings. A decoder
(a GGUF file, an HF Llama-family folder) serves all three; its embeddings
pool the last token (or the mean: --embedding-pooling) into unit vectors,
from inputs of up to --max-model-len tokens.
An encoder folder (BERT, e.g. all-MiniLM-L6-v2) serves /v1/embeddings only,
pooled as its sentence-transformers files say; its other lines get a 400
`model_not_supported` error line, and the engine flags do not apply.

Output, one line per input line, in the order requests finish (OpenAI's
output is unordered too; match lines by custom_id):

    {"id": "batch_req_…", "custom_id": "r1", "error": null,
     "response": {"status_code": 200, "request_id": "req_…", "body": {a chat.completion}}}

A line that cannot be served gets an error line and the rest goes on.
`error` is {"code", "message", "param", "line"} (the fields of OpenAI's
batch errors; `line` counts from 1). A bad request body (an invalid or
unsupported parameter, a prompt too long) keeps its custom_id and gets
`response` {"status_code": 400, "request_id", "body": {"error": OpenAI's
error object}}; a line that is no request at all (not JSON, no custom_id, a
repeated custom_id, a method or url we do not serve) gets `response` null.

Requests run with continuous batching: up to `max_in_flight` lines are in
flight at once, and each is written as soon as it finishes. Embeddings
lines need no engine: those read in one pass over the input (they count
toward `max_in_flight`) are embedded together, in one `Embedder.embed`
call, and written with that pass's other finished lines.

Exactly once, across crashes and kills:
- each step's finished lines are built in full, then written with one
  write() and fsync()ed, so the file holds whole lines plus, at worst, a
  torn tail;
- on start, a torn last line (no newline, or not JSON) is cut off, and the
  lines already there are skipped: by custom_id, or by input line number
  for error lines (the only way to know a line without a custom_id);
- a custom_id is served at its first line; a later line with the same
  custom_id gets a `duplicate_custom_id` error line.
So a rerun with the same input appends only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import msgspec

from checkpoints.encoder_dir import is_encoder_folder, load_encoder
from checkpoints.loader import LoadedModel, model_name, model_name_for
from engine import distributed
from engine.embedder import Embedder
from engine.engine_args import add_engine_arguments, engine_config_from_args
from engine.llm import LLM
from engine.outputs import RequestOutput, RequestRejected
from model.pooling import PoolingMode
from serving import openai_embeddings, openai_requests, schemas
from serving.errors import RequestError, decode_body, rejected
from serving.openai_embeddings import EmbeddingsRequest
from serving.openai_requests import Endpoint, ParsedRequest
from serving.openai_responses import TokenTexts, chat_completion, text_completion

EMBEDDINGS_URL = "/v1/embeddings"  # not an engine Endpoint: embeddings never reach the engine
_BODY_TYPES = {Endpoint.CHAT: schemas.ChatCompletionRequest, Endpoint.COMPLETIONS: schemas.CompletionRequest}
EMBEDDING_POOLINGS = ("last", "mean")  # what a decoder's embeddings can pool


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSummary:
    num_results: int  # lines written with status 200
    num_errors: int  # error lines written
    num_skipped: int  # input lines already in the output file


@dataclasses.dataclass(slots=True)
class _Job:
    """One input line in the engine."""

    line_number: int
    custom_id: str
    request: ParsedRequest
    created: int


@dataclasses.dataclass(slots=True)
class _EmbeddingJob:
    """One embeddings line, waiting for this pass's embed call."""

    custom_id: str
    request: EmbeddingsRequest
    token_ids: list[list[int]]


class _Admission(enum.Enum):
    SUBMITTED = "submitted"  # now in the engine, or waiting for this pass's embed call
    SKIPPED = "skipped"  # already in the output file
    REJECTED = "rejected"  # an error line to write


class _LineError(Exception):
    """An input line that is no request: written with `response` null."""

    def __init__(self, code: str, message: str, *, custom_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id, self.param = code, message, custom_id, param


# -- the command ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The run-batch flags, plus the engine's (engine_args: one to one onto EngineConfig)."""
    parser.add_argument("-i", "--input-file", type=Path, required=True,
                        help="OpenAI Batch API input: one JSON request a line")
    parser.add_argument("-o", "--output-file", type=Path, required=True,
                        help="results, one JSON line per input line; appended to, so a rerun resumes")
    parser.add_argument("--model", default=None,
                        help="GGUF file, HF safetensors folder, or an encoder folder (BERT, embeddings only) "
                             "(default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` of every response (default: the model's file or folder name)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="requests read ahead into the engine (default: 2 x --max-num-seqs; "
                             "for an encoder, 2 x its batch of 32)")
    parser.add_argument("--embedding-pooling", choices=EMBEDDING_POOLINGS, default=None,
                        help="a decoder's /v1/embeddings vector: the last token's hidden state or the mean "
                             "over tokens (default: last); encoders pool as their folder says")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(parser)


def run_batch_command(args: argparse.Namespace) -> int:
    """The `balansis run-batch` handler: load the model, run the file, print a summary."""
    if not args.input_file.is_file():  # before the model loads
        raise ValueError(f"{args.input_file}: no such file")
    if distributed.is_multi_process():
        raise ValueError("run-batch runs in one process; across hosts, run `balansis serve` and send "
                         "the requests to it")
    started = time.perf_counter()
    model, served_model_name = _load_model(args)
    summary = run_batch(model, input_path=args.input_file, output_path=args.output_file,
                        served_model_name=served_model_name, max_in_flight=args.max_in_flight,
                        show_progress=not args.no_progress, embedding_pooling=args.embedding_pooling or "last")
    print(f"{summary.num_results} results, {summary.num_errors} errors, {summary.num_skipped} already "
          f"done → {args.output_file} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


def _load_model(args: argparse.Namespace) -> tuple[LLM | Embedder, str | None]:
    """An Embedder for an encoder folder, else an LLM; and the served name, if run_batch cannot know it."""
    if args.model is None or not is_encoder_folder(Path(args.model)):
        return LLM(args.model, config=engine_config_from_args(args)), args.served_model_name
    if args.embedding_pooling is not None:
        raise ValueError("--embedding-pooling is for decoder models; an encoder folder pools as its "
                         "sentence-transformers files say")
    # The engine flags do not apply: an encoder has no KV cache. Nor is JAX's persistent
    # compilation cache turned on, which would change JAX's config for the whole process.
    embedder = Embedder.for_encoder(load_encoder(args.model))
    return embedder, args.served_model_name or model_name_for(Path(args.model).resolve())


# -- the run ----------------------------------------------------------------------------


def run_batch(model: LLM | LoadedModel | Embedder, *, input_path: str | Path, output_path: str | Path,
              served_model_name: str | None = None, max_in_flight: int | None = None,
              show_progress: bool = True, embedding_pooling: PoolingMode | str = "last") -> BatchSummary:
    """Run every input line not yet in `output_path` through the model; append the results.

    `model` is an LLM, a LoadedModel run with the default EngineConfig (both
    serve completions, chat and embeddings, pooled by `embedding_pooling`:
    PoolingMode.LAST or MEAN, or its value), or an Embedder (embeddings only;
    it needs `served_model_name`, as it does not know its folder).
    Raises ValueError for an unusable input path or an output file that is
    not a results file. Safe to kill at any moment and run again.
    """
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ValueError(f"{input_path}: no such file")
    if output_path.is_dir() or not output_path.parent.is_dir():
        raise ValueError(f"{output_path}: cannot write a file there")
    if output_path.exists() and output_path.samefile(input_path):
        raise ValueError(f"{output_path}: the output file must not be the input file")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    runner = _Runner.for_model(model, served_model_name=served_model_name, embedding_pooling=embedding_pooling)
    max_in_flight = max_in_flight or runner.default_max_in_flight()
    # Bytes, not text: a line that is not UTF-8 is an error line, not the end of the run.
    with open(input_path, "rb") as f:
        num_lines = sum(1 for line in f if line.strip())
    results = _ResultsFile(output_path)
    num_results = num_errors = num_skipped = 0
    seen: set[str] = set()  # custom_ids met so far in the input
    try:
        with open(input_path, "rb") as f, \
                tqdm(total=num_lines, unit="req", file=sys.stderr, disable=not show_progress,
                     dynamic_ncols=True) as bar:
            lines: Iterator[tuple[int, bytes]] = enumerate(f, 1)
            is_exhausted = False
            while True:
                written: list[bytes] = []
                while not is_exhausted and runner.num_in_flight < max_in_flight:
                    numbered = next(lines, None)
                    if numbered is None:
                        is_exhausted = True
                    elif numbered[1].strip():
                        admission, error_line = runner.admit(*numbered, seen=seen, results=results)
                        if admission is _Admission.SKIPPED:
                            num_skipped += 1
                            bar.update(1)
                        elif admission is _Admission.REJECTED:
                            written.append(error_line)
                            num_errors += 1
                finished = runner.embed_pending() + runner.step()
                written += finished
                num_results += len(finished)
                results.append(written)
                bar.update(len(written))
                if is_exhausted and not runner.num_in_flight:
                    break
    finally:
        runner.abort()  # interrupted: free the engine for the caller
        results.close()
    return BatchSummary(num_results=num_results, num_errors=num_errors, num_skipped=num_skipped)


class _Runner:
    """Turns input lines into engine requests or embed inputs, and their outputs into result lines."""

    def __init__(self, llm: LLM | None, embedder: Embedder | None, *, served_model_name: str,
                 embedding_pooling: PoolingMode):
        self._llm = llm
        self._embedder = embedder  # a decoder's is made on its first embeddings line
        self._embedding_pooling = embedding_pooling
        self._model = served_model_name
        self._token_text = TokenTexts(llm.tokenizer) if llm is not None else None
        self.in_flight: dict[str, _Job] = {}  # by engine request id
        self.pending_embeddings: list[_EmbeddingJob] = []

    @classmethod
    def for_model(cls, model: LLM | LoadedModel | Embedder, *, served_model_name: str | None,
                  embedding_pooling: PoolingMode | str) -> _Runner:
        pooling = PoolingMode(embedding_pooling)
        if pooling.value not in EMBEDDING_POOLINGS:  # checked now, not at the first embeddings line
            raise ValueError(f"embedding_pooling must be one of {list(EMBEDDING_POOLINGS)}, got {pooling.value!r}")
        if isinstance(model, Embedder):
            if served_model_name is None:
                raise ValueError("an Embedder does not know its folder: pass served_model_name")
            return cls(None, model, served_model_name=served_model_name, embedding_pooling=pooling)
        llm = model if isinstance(model, LLM) else LLM(model)
        return cls(llm, None, served_model_name=served_model_name or model_name(llm.engine.loaded),
                   embedding_pooling=pooling)

    def default_max_in_flight(self) -> int:
        if self._llm is None:  # an encoder: two of its batches per embed call
            return 2 * self._embedder.max_batch_size
        return 2 * self._llm.engine.config.max_num_seqs

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight) + len(self.pending_embeddings)

    def admit(self, line_number: int, text: bytes, *, seen: set[str],
              results: _ResultsFile) -> tuple[_Admission, bytes | None]:
        """Submit the line to the engine or the next embed call, skip it, or reject it with an
        error line (returned)."""
        try:
            request = self._request(line_number, text, seen=seen, results=results)
        except _LineError as e:
            if line_number in results.done_lines:
                return _Admission.SKIPPED, None
            return _Admission.REJECTED, _line(
                custom_id=e.custom_id, response=None,
                error={"code": e.code, "message": e.message, "param": e.param, "line": line_number})
        if request is None:
            return _Admission.SKIPPED, None
        custom_id, url, body = request
        try:
            if url == EMBEDDINGS_URL:
                self._queue_embedding(custom_id, body)
            else:
                self._submit(line_number, custom_id, Endpoint(url), body)
        except RequestError as e:
            return _Admission.REJECTED, _line(
                custom_id=custom_id,
                response={"status_code": e.status_code, "request_id": _request_id(), "body": e.body()},
                error={"code": e.code, "message": e.message, "param": e.param, "line": line_number})
        return _Admission.SUBMITTED, None

    def _request(self, line_number: int, text: bytes, *, seen: set[str],
                 results: _ResultsFile) -> tuple[str, str, Any] | None:
        """(custom_id, url, body) of a request line; None if it is already in the output file."""
        item = _request_line(text)
        custom_id = item["custom_id"]
        if line_number in results.done_lines or (custom_id not in seen and custom_id in results.done_custom_ids):
            seen.add(custom_id)
            return None
        if custom_id in seen:
            raise _LineError("duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line; "
                             "only the first is run", custom_id=custom_id, param="custom_id")
        seen.add(custom_id)
        if item.get("method") != "POST":
            raise _LineError("invalid_method", f"method must be POST, got {item.get('method')!r}",
                             custom_id=custom_id, param="method")
        urls = [e.value for e in Endpoint] + [EMBEDDINGS_URL]
        if item.get("url") not in urls:
            raise _LineError("invalid_url", f"url must be one of {urls}, got {item.get('url')!r}",
                             custom_id=custom_id, param="url")
        return custom_id, item["url"], item.get("body")

    def _submit(self, line_number: int, custom_id: str, endpoint: Endpoint, body: Any) -> None:
        """Add a completions or chat line to the engine; a RequestError if it cannot run."""
        if self._llm is None:
            # The server's code for the same mistake.
            raise RequestError(f"{self._model!r} is an embedding model; it serves {EMBEDDINGS_URL} only, "
                               f"not {endpoint.value}", code="model_not_supported")
        engine = self._llm.engine
        decoded = decode_body(body, _BODY_TYPES[endpoint])
        request = (openai_requests.parse_chat(decoded) if endpoint is Endpoint.CHAT
                   else openai_requests.parse_completion(decoded))
        if request.stream:
            raise RequestError("stream is not supported in a batch", param="stream", code="unsupported_parameter")
        if len(request.prompts) > 1:
            raise RequestError("one prompt per batch line", param="prompt")
        (prompt_ids,) = openai_requests.prompt_token_ids(request, engine.info.tokenizer)
        params = openai_requests.sampling_params(request, prompt_ids, engine)
        request_id = f"batch-line-{line_number}"
        try:
            engine.add_request(request_id, prompt_ids, params)
        except RequestRejected as e:  # checked already; the engine's word is final
            raise rejected(e, prompt_param=request.prompt_param, max_tokens_param=request.max_tokens_param) from None
        self.in_flight[request_id] = _Job(line_number, custom_id, request, int(time.time()))

    def _queue_embedding(self, custom_id: str, body: Any) -> None:
        """Check an embeddings line and keep its token ids for this pass's embed call."""
        request = openai_embeddings.parse_embeddings_request(decode_body(body, schemas.EmbeddingsRequest))
        embedder = self._embedder_or_make()
        openai_embeddings.check_dimensions(request, embedder.dimensions)
        token_ids = openai_embeddings.input_token_ids(request, embedder)
        self.pending_embeddings.append(_EmbeddingJob(custom_id, request, token_ids))

    def _embedder_or_make(self) -> Embedder:
        if self._embedder is None:  # lazily: a file without embeddings lines never builds one
            # Inputs as long as the engine's prompts (--max-model-len), as the server allows.
            engine = self._llm.engine
            self._embedder = Embedder.for_decoder(engine.loaded, pooling=self._embedding_pooling,
                                                  max_length=engine.max_model_len)
        return self._embedder

    def embed_pending(self) -> list[bytes]:
        """The result lines of every pending embeddings line, from one embed call."""
        jobs, self.pending_embeddings = self.pending_embeddings, []
        if not jobs:
            return []
        vectors = self._embedder.embed([ids for job in jobs for ids in job.token_ids])
        lines, start = [], 0
        for job in jobs:
            stop = start + len(job.token_ids)
            body = openai_embeddings.embeddings_response(vectors[start:stop], request=job.request, model=self._model,
                                                 num_prompt_tokens=sum(map(len, job.token_ids)))
            lines.append(_line(custom_id=job.custom_id, error=None,
                               response={"status_code": 200, "request_id": _request_id(), "body": body}))
            start = stop
        return lines

    def step(self) -> list[bytes]:
        """One engine step; the result lines of the requests it finished."""
        if not self.in_flight:
            return []
        return [self._result_line(self.in_flight.pop(output.request_id), output)
                for output in self._llm.engine.step() if output.finished]

    def abort(self) -> None:
        """Take unfinished requests out of the engine; drop pending embeddings."""
        for request_id in self.in_flight:
            self._llm.engine.abort_request(request_id)
        self.in_flight.clear()
        self.pending_embeddings.clear()

    def _result_line(self, job: _Job, output: RequestOutput) -> bytes:
        common = dict(request=job.request, created=job.created, model=self._model, token_text=self._token_text)
        if job.request.endpoint is Endpoint.CHAT:
            body = chat_completion(output, response_id=f"chatcmpl-{uuid.uuid4().hex}", **common)
        else:
            prompt = job.request.prompts[0]
            prompt_text = prompt if isinstance(prompt, str) else self._llm.tokenizer.decode(prompt)
            body = text_completion([output], prompt_texts=[prompt_text], response_id=f"cmpl-{uuid.uuid4().hex}",
                                   **common)
        return _line(custom_id=job.custom_id, error=None,
                     response={"status_code": 200, "request_id": _request_id(), "body": body})


def _request_line(text: bytes) -> dict[str, Any]:
    try:
        item = msgspec.json.decode(text)
    except msgspec.DecodeError as e:  # not JSON, or bytes that are not UTF-8
        raise _LineError("invalid_json", f"not valid JSON: {e}") from None
    except RecursionError:  # `[[[[…]]]]` past the decoder's recursion limit
        raise _LineError("invalid_json", "nested too deeply to decode") from None
    if not isinstance(item, dict):
        raise _LineError("invalid_json", "a request line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError("missing_custom_id", f"custom_id must be a non-empty string, got {custom_id!r}",
                         param="custom_id")
    return item


def _line(*, custom_id: str | None, response: dict | None, error: dict | None) -> bytes:
    """One result line; a response body is a Struct (serving.schemas) or an error object."""
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
              "error": error}
    return msgspec.json.encode(record) + b"\n"


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


# -- the output file ------------------------------------------------------------------------


class _ResultsFile:
    """The output file: repaired on open, then appended to whole lines at a time, fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self.done_custom_ids: set[str] = set()
        self.done_lines: set[int] = set()  # input line numbers of error lines
        data = path.read_bytes() if path.exists() else b""
        keep = self._read(data)
        if keep < len(data):
            os.truncate(path, keep)  # a torn tail from a killed run
        is_new = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.fsync(self._fd)
        if is_new:  # make the new file's directory entry durable too
            _fsync_dir(path.parent)

    def _read(self, data: bytes) -> int:
        """Note the lines already done; return how many bytes of whole lines to keep."""
        keep = data.rfind(b"\n") + 1  # after the last newline: a torn write
        lines = data[:keep].split(b"\n")[:-1]
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = msgspec.json.decode(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (msgspec.DecodeError, ValueError):
                if number == len(lines):  # the last line's write was torn
                    return keep - len(raw) - 1
                raise ValueError(f"{self.path}: line {number} is not a result line; "
                                 "refusing to append to this file") from None
            error = record.get("error") or {}
            if isinstance(error, dict) and isinstance(error.get("line"), int):
                self.done_lines.add(error["line"])
            if isinstance(record.get("custom_id"), str) and error.get("code") != "duplicate_custom_id":
                self.done_custom_ids.add(record["custom_id"])
        return keep

    def append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = memoryview(b"".join(lines))
        while data:  # one write() unless the kernel takes less
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
