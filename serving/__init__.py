"""The product's faces over the engine: the OpenAI-compatible HTTP server (Litestar + msgspec),
the seed API, `balansis run-batch`, and the `balansis` command line (`serving.cli`)."""
