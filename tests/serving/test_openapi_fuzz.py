"""The server against its own OpenAPI document, fuzzed by schemathesis (a bounded run): every
operation, positive and negative data; no 5xx, every status and body as documented, auth not
ignored, required headers enforced. And the document's own promises: every operation documents
its error statuses and headers, streamed routes document their events, request schemas say what
the parser takes."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (ignored_auth, missing_required_header, response_schema_conformance,
                                               status_code_conformance)

from tests.serving.conftest import start_server

ADMIN = "fuzz-admin"
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, ignored_auth,
          missing_required_header]
ERROR_STATUSES = {"400", "401", "403", "404", "413", "429", "503"}


@pytest.fixture(scope="module")
def fuzzed_server(tiny_loaded, tmp_path_factory):
    """Authentication on; small bounds, so generated requests stay quick (a bigger one is a 400)."""
    from serving.request_limits import RequestLimits

    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'keys.db'}"
    server = start_server(tiny_loaded, api_keys=(ADMIN,), require_auth=True, database_url=url,
                          max_auth_failures_per_minute=None,
                          limits=RequestLimits(max_completion_tokens=8, max_n=2, max_prompt_tokens=64))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def document(fuzzed_server):
    return httpx.get(fuzzed_server.url + "/docs/openapi.json", timeout=60).json()


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/docs/openapi.json")


# Per operation and mode, a bounded number of generated requests (derandomized: the same ones each run).
FUZZ_SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck),
                         derandomize=True, database=None)


def test_every_operation_holds_to_the_document(fuzzed_server, api_schema):
    """Every operation, positive and negative data (schemathesis's strategies driven by hypothesis
    here, as its pytest plugin would); all failures are reported together."""
    failures, statuses = [], []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ_SETTINGS
            @given(operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                response = case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS, timeout=120,
                                                  headers={"Authorization": f"Bearer {ADMIN}"})
                statuses.append(response.status_code)

            try:
                fuzz()
            except Unsatisfiable:  # negative data for an operation that takes nothing: none to make
                assert mode is GenerationMode.NEGATIVE, operation.path
            except Exception as e:  # a check's failure, with the request that caused it
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)
    # The run reached the operations for real: many requests, successes and refusals among them.
    assert len(statuses) >= 10 * len(operations) and {200, 400} <= set(statuses), sorted(set(statuses))
    health = httpx.get(fuzzed_server.url + "/health", timeout=60)
    assert health.status_code == 200  # and the server still serves


def test_every_operation_documents_its_errors_and_headers(document):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            for response in responses.values():
                assert "x-request-id" in response["headers"], (method, path)
            if path in ("/health", "/ready", "/metrics"):
                assert "security" not in operation
                continue
            assert ERROR_STATUSES <= set(responses), (method, path)
            assert operation["security"] == [{"bearer": []}], (method, path)
            assert {"Retry-After", "retry-after-ms"} <= set(responses["429"]["headers"]), (method, path)
            success = next(s for s in responses if s.startswith("2"))
            assert "x-ratelimit-remaining-requests" in responses[success]["headers"], (method, path)


def test_streamed_routes_document_json_and_events(document):
    for path in ("/v1/chat/completions", "/v1/completions", "/api/v1/chat"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert "$ref" in content["application/json"]["schema"]  # the object itself, not "it or anything"


def test_request_schemas_say_what_the_parser_takes(document):
    schemas = document["components"]["schemas"]
    message = schemas["ChatMessage"]
    assert message["properties"]["role"]["enum"] == ["assistant", "developer", "system", "user"]
    assert message["additionalProperties"] is False and message["properties"]["tool_calls"] == {"type": "null"}
    chat = schemas["ChatCompletionRequest"]
    assert chat["required"] == ["messages"] and chat["properties"]["messages"]["minItems"] == 1
    assert chat["properties"]["tools"] == {"enum": [None, []]}
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert len(prompt) == 4 and all(form != {} for form in prompt)
