"""Running models: jitted forward passes over the paged KV cache, sampling, generation, the CLI."""
