"""The engine: requests in, tokens out, no HTTP and no OpenAI shapes.

Requests and sequences, the scheduler and the paged KV block manager (plain
Python), the batch runner (bucketed jitted steps, donated cache, shardings),
the sampler, the detokenizer, plain output types (`outputs`), `LLMEngine`
(one step at a time), `LLM` (scripts) and `AsyncEngine` (the server), the
embedder, and `balansis generate`. The layers above (serving/) call down
into it; it calls only checkpoints/ and model/.
"""
