"""The Litestar app factory.

    app = create_app(ServerState(ServeConfig(...), [ModelSpec(name, load), ...]))

Routes: OpenAI's (/v1/…), the seed API (/api/v1/…, /models), /tokenize and
/detokenize, /version and the admin API (/admin/…, admin keys only), all
behind one authentication guard when authentication is on (serving.auth);
/health, /ready, /metrics and the OpenAPI docs (/docs) are open, as probes
and scrapers expect. The models load when the app starts (see ServerState).
"""

from __future__ import annotations

from importlib import metadata

import anyio.to_thread
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from serving import admin_routes, openai_routes, ops_routes, seed_routes
from serving.auth import principal_of
from serving.errors import EXCEPTION_HANDLERS, RequestError
from serving.generation import ClientDisconnected
from serving.http_observer import HttpObserver
from serving.openapi import FinishedJson
from serving.state import ServerState


def create_app(server: ServerState) -> Litestar:
    authenticator = server.authenticator

    failures = server.auth_failure_limit

    async def authenticate(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not authenticator.is_on:
            return
        address = connection.client.host if connection.client else "unknown"
        if failures is not None:
            try:
                failures.check(address)
            except RequestError:
                server.metrics.rate_limited.labels("auth_failures").inc()
                raise
        try:  # a stored key is looked up in the database: off the event loop
            principal = await anyio.to_thread.run_sync(authenticator.authenticate,
                                                       connection.headers.get("authorization"))
        except RequestError:
            server.metrics.auth_failures.inc()
            if failures is not None:
                failures.count(address)
            raise
        connection.state.principal = principal
        # Every authenticated response says where the caller's budget stands (serving.http_observer
        # adds the headers); a generating request replaces them by what its reservation left.
        snapshot = await server.rate_limiter.peek(principal.budget)
        if snapshot is not None:
            connection.state.response_headers = snapshot.headers()

    def require_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        # Without authentication everyone is ANONYMOUS (an admin for the other routes' checks); the
        # key store may be shared with replicas that do authenticate, so it stays closed.
        if not authenticator.is_on:
            raise RequestError("the admin API needs authentication on (--api-key, --require-auth or a JWT "
                               "key source)", status_code=403, code="insufficient_permissions")
        principal_of(connection).check_admin()

    admin = Router(path="/admin", guards=[require_admin], route_handlers=admin_routes.ROUTES)
    api = Router(path="/", guards=[authenticate], route_handlers=[
        openai_routes.list_models, openai_routes.retrieve_model, openai_routes.chat_completions,
        openai_routes.completions, openai_routes.embeddings, ops_routes.tokenize, ops_routes.detokenize,
        seed_routes.seed_generate, seed_routes.seed_chat, seed_routes.seed_embeddings, seed_routes.seed_models,
        ops_routes.version, admin])
    app = Litestar(
        route_handlers=[ops_routes.health, ops_routes.ready, ops_routes.metrics, api],
        dependencies={"server": Provide(lambda: server, use_cache=True, sync_to_thread=False)},
        exception_handlers={**EXCEPTION_HANDLERS, ClientDisconnected: _client_gone},
        on_startup=[server.start_loading],
        on_shutdown=[server.shutdown, server.close_connections],
        request_max_body_size=server.config.max_body_bytes,
        cors_config=_cors(server.config.allowed_origins),
        logging_config=None,  # logging is the server's (serving.logs), not a second format of Litestar's
        openapi_config=OpenAPIConfig(title="BalansisLLM", version=metadata.version("balansis"), path="/docs",
                                     render_plugins=[FinishedJson(is_auth_on=authenticator.is_on),
                                                     SwaggerRenderPlugin()]),
        signature_namespace={"ServerState": ServerState},
    )
    # Around Litestar's own handler (its routing, exception handling and CORS), so 404s are seen too.
    app.asgi_handler = HttpObserver(app.asgi_handler, server.metrics, log_requests=server.config.log_requests,
                                    record_usage=server.record_usage, log_prompts=server.config.log_prompts,
                                    is_auth_on=authenticator.is_on)
    return app


def _cors(origins: tuple[str, ...]) -> CORSConfig | None:
    """Browsers on `origins` may call the API (preflights answered before authentication, which
    they carry no key for); the headers SDKs read are exposed. No cookies: keys travel in headers."""
    if not origins:
        return None
    return CORSConfig(allow_origins=list(origins), allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                      allow_headers=["Authorization", "Content-Type", "X-Request-ID", "OpenAI-Organization",
                                     "OpenAI-Project", "X-Stainless-Arch", "X-Stainless-Lang",
                                     "X-Stainless-OS", "X-Stainless-Package-Version", "X-Stainless-Runtime",
                                     "X-Stainless-Runtime-Version", "X-Stainless-Retry-Count"],
                      expose_headers=["Retry-After", "X-Request-ID"], allow_credentials=False, max_age=600)


def _client_gone(_, __):
    # Nobody reads this: the connection is closed. The engine requests
    # were aborted when the handler's work was cancelled.
    from litestar import Response

    return Response(b"", status_code=499)
