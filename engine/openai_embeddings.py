"""OpenAI embeddings bodies → inputs for the embedder; vectors → OpenAI's response.

Shared by the server's `/v1/embeddings` and `balansis run-batch`, like
`engine.openai_format` for completions. Problems are `RequestError`s naming
the parameter.

- `input`: a string, a list of strings, a list of token ids, or a list of
  token id lists (OpenAI's four forms); never empty, at most MAX_INPUTS
  items (OpenAI's limit).
- `encoding_format`: "float" (default) or "base64" (little-endian float32
  bytes, what the OpenAI SDKs decode).
- `dimensions`: only the model's own size, unless the model can be
  truncated (none of ours declares that yet): anything else is a 400.
- `truncate_prompt_tokens` (vLLM's extension): cut the end of each input to
  this many tokens (-1: the model's maximum), as sentence-transformers cuts,
  instead of refusing an over-long one.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Mapping

import numpy as np

from engine.openai_format import RequestError, text_or_token_inputs

MAX_INPUTS = 2048
_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user", "truncate_prompt_tokens"})


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str | None
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str  # "float" or "base64"
    dimensions: int | None
    truncate_to: int | None  # tokens; -1: the model's maximum; None: refuse over-long inputs


def parse_embeddings_request(body: Any) -> EmbeddingsRequest:
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    for key in body:
        if key not in _FIELDS:
            raise RequestError(f"unrecognized request argument supplied: {key}", param=key,
                               code="unknown_parameter")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
                           param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                   or dimensions < 1):
        raise RequestError(f"dimensions must be a positive integer, got {dimensions!r}", param="dimensions")
    truncate_to = body.get("truncate_prompt_tokens")
    if truncate_to is not None and (isinstance(truncate_to, bool) or not isinstance(truncate_to, int)
                                    or not (truncate_to == -1 or truncate_to >= 1)):
        raise RequestError(f"truncate_prompt_tokens must be -1 or a positive integer, got {truncate_to!r}",
                           param="truncate_prompt_tokens")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    inputs = text_or_token_inputs(body.get("input"), param="input")
    if len(inputs) > MAX_INPUTS:
        raise RequestError(f"input has {len(inputs)} items; at most {MAX_INPUTS} are allowed", param="input")
    return EmbeddingsRequest(model=model, inputs=inputs,
                             encoding_format=encoding_format, dimensions=dimensions, truncate_to=truncate_to)


def check_dimensions(request: EmbeddingsRequest, model_dimensions: int) -> None:
    if request.dimensions is not None and request.dimensions != model_dimensions:
        raise RequestError(f"this model makes {model_dimensions}-dimensional embeddings and cannot be "
                           f"truncated to {request.dimensions}", param="dimensions")


def embeddings_response(vectors: np.ndarray, *, request: EmbeddingsRequest, model: str,
                        num_prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's `list` of `embedding` objects, in input order, with usage."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, request.encoding_format)}
            for i, v in enumerate(np.asarray(vectors, np.float32))]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens}}


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    vector = np.asarray(vector, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def input_token_ids(request: EmbeddingsRequest, embedder) -> list[list[int]]:
    """Token ids of every input, cut or refused at the model's maximum length."""
    limit = embedder.max_length
    truncate_to = None if request.truncate_to is None else (
        limit if request.truncate_to == -1 else min(request.truncate_to, limit))
    ids: list[list[int]] = []
    for i, item in enumerate(request.inputs):
        row = embedder.tokenizer.encode(item, max_length=truncate_to) if isinstance(item, str) \
            else list(item)[:truncate_to]
        if not row:
            raise RequestError(f"input {i} is empty", param="input")
        if len(row) > limit:
            raise RequestError(f"input {i} has {len(row)} tokens; this model's maximum context length is "
                               f"{limit} (truncate_prompt_tokens cuts inputs instead)", param="input",
                               code="context_length_exceeded")
        vocab = embedder.vocab_size
        if min(row) < 0 or max(row) >= vocab:
            raise RequestError(f"input {i}: token ids must be in [0, {vocab})", param="input")
        ids.append(row)
    return ids
