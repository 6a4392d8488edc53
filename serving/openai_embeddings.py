"""OpenAI embeddings bodies (decoded Structs) → inputs for the embedder; vectors → OpenAI's response.

Shared by the server's `/v1/embeddings` (and the seed route) and `balansis
run-batch`, like `serving.openai_requests` for completions. Problems are
`RequestError`s naming the parameter.

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
from typing import TYPE_CHECKING

import numpy as np

from engine.outputs import RequestRejected
from serving import schemas
from serving.errors import RequestError, rejected
from serving.openai_requests import text_or_token_inputs

if TYPE_CHECKING:
    from engine.embedder import Embedder

MAX_INPUTS = 2048


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    model: str | None
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str  # "float" or "base64"
    dimensions: int | None
    truncate_to: int | None  # tokens; -1: the model's maximum; None: refuse over-long inputs


def parse_embeddings_request(body: schemas.EmbeddingsRequest) -> EmbeddingsRequest:
    """Check an embeddings body; raises RequestError naming the first problem."""
    encoding_format = body.encoding_format or "float"
    if encoding_format not in ("float", "base64"):
        raise RequestError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}",
                           param="encoding_format")
    if body.dimensions is not None and body.dimensions < 1:
        raise RequestError(f"dimensions must be a positive integer, got {body.dimensions!r}", param="dimensions")
    truncate_to = body.truncate_prompt_tokens
    if truncate_to is not None and not (truncate_to == -1 or truncate_to >= 1):
        raise RequestError(f"truncate_prompt_tokens must be -1 or a positive integer, got {truncate_to!r}",
                           param="truncate_prompt_tokens")
    inputs = text_or_token_inputs(body.input, param="input")
    if len(inputs) > MAX_INPUTS:
        raise RequestError(f"input has {len(inputs)} items; at most {MAX_INPUTS} are allowed", param="input")
    return EmbeddingsRequest(model=body.model, inputs=inputs, encoding_format=encoding_format,
                             dimensions=body.dimensions, truncate_to=truncate_to)


def check_dimensions(request: EmbeddingsRequest, model_dimensions: int) -> None:
    if request.dimensions is not None and request.dimensions != model_dimensions:
        raise RequestError(f"this model makes {model_dimensions}-dimensional embeddings and cannot be "
                           f"truncated to {request.dimensions}", param="dimensions")


def embeddings_response(vectors: np.ndarray, *, request: EmbeddingsRequest, model: str,
                        num_prompt_tokens: int) -> schemas.EmbeddingList:
    """OpenAI's `list` of `embedding` objects, in input order, with usage."""
    data = [schemas.Embedding(object="embedding", index=i, embedding=encode_vector(v, request.encoding_format))
            for i, v in enumerate(np.asarray(vectors, np.float32))]
    return schemas.EmbeddingList(object="list", data=data, model=model, usage=schemas.EmbeddingUsage(
        prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens))


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    vector = np.asarray(vector, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def input_token_ids(request: EmbeddingsRequest, embedder: Embedder) -> list[list[int]]:
    """Token ids of every input, cut at the model's maximum length when asked, checked by the
    embedder (Embedder.check)."""
    limit = embedder.max_length
    truncate_to = None if request.truncate_to is None else (
        limit if request.truncate_to == -1 else min(request.truncate_to, limit))
    ids = [embedder.tokenizer.encode(item, max_length=truncate_to) if isinstance(item, str)
           else list(item)[:truncate_to] for item in request.inputs]
    try:
        embedder.check(ids)
    except RequestRejected as e:
        error = rejected(e, prompt_param="input")
        if e.is_context_length:
            error.message += " (truncate_prompt_tokens cuts inputs instead)"
        raise error from None
    return ids
