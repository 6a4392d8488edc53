"""The Litestar app factory.

    app = create_app(ServerState(ServeConfig(...), [ModelSpec(name, load), ...]))

Routes: OpenAI's (/v1/…), the seed API (/api/v1/…, /models), /tokenize and
/detokenize, all behind the API key check when keys are set; /health,
/ready, /metrics, /version and the OpenAPI docs (/docs) are open, as probes
and scrapers expect. The models load when the app starts (see ServerState).
"""

from __future__ import annotations

from importlib import metadata

from litestar import Litestar, Router
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from serving import ops_routes, openai_routes, seed_routes
from serving.errors import EXCEPTION_HANDLERS, RequestError
from serving.generation import ClientDisconnected
from serving.state import ServerState


def create_app(server: ServerState) -> Litestar:
    keys = frozenset(server.config.api_keys)

    def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not keys:
            return
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in keys:
            message = ("missing API key: send it as 'Authorization: Bearer KEY'" if not token.strip()
                       else "incorrect API key provided")
            raise RequestError(message, status_code=401, code="invalid_api_key")

    api = Router(path="/", guards=[require_api_key], route_handlers=[
        openai_routes.list_models, openai_routes.retrieve_model, openai_routes.chat_completions,
        openai_routes.completions, openai_routes.embeddings, ops_routes.tokenize, ops_routes.detokenize,
        seed_routes.seed_generate, seed_routes.seed_chat, seed_routes.seed_embeddings, seed_routes.seed_models])
    return Litestar(
        route_handlers=[ops_routes.health, ops_routes.ready, ops_routes.metrics, ops_routes.version, api],
        dependencies={"server": Provide(lambda: server, use_cache=True, sync_to_thread=False)},
        exception_handlers={**EXCEPTION_HANDLERS, ClientDisconnected: _client_gone},
        on_startup=[server.start_loading],
        on_shutdown=[server.shutdown],
        request_max_body_size=server.config.max_body_bytes,
        openapi_config=OpenAPIConfig(title="BalansisLLM", version=metadata.version("balansis"), path="/docs",
                                     render_plugins=[SwaggerRenderPlugin()]),
        signature_namespace={"ServerState": ServerState},
    )


def _client_gone(_, __):
    # Nobody reads this: the connection is closed. The engine requests
    # were aborted when the handler's work was cancelled.
    from litestar import Response

    return Response(b"", status_code=499)
