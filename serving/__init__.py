"""The OpenAI-compatible HTTP server (Litestar + msgspec); built by the serving issue."""
