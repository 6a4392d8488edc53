"""`balansis generate`: one prompt or chat message through the engine, streamed to stdout.

    balansis generate --chat "Name three rivers." [--model PATH] [--max-tokens 128] [--temperature 0.7]

The text goes to stdout as it is generated; a summary line (tokens, time to
first token, decode rate, load time) to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.engine_args import add_engine_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generate flags, plus the engine's (engine_args: one to one onto EngineConfig)."""
    parser.add_argument("--model", default=None,
                        help="GGUF file or HF safetensors folder (default: SmolLM2-135M-Instruct Q4_1)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text to continue")
    prompt.add_argument("--chat", help="a user message, formatted with the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_engine_arguments(parser)


def generate_command(args: argparse.Namespace) -> int:
    """The `balansis generate` handler."""
    import jax

    from checkpoints.loader import load_model
    from engine.engine_args import engine_config_from_args
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    started = time.perf_counter()
    engine_config = engine_config_from_args(args, max_num_seqs=1)
    loaded = load_model(args.model, dtype=engine_config.weight_dtype(), mesh=engine_config.mesh())
    tokenizer = loaded.tokenizer
    if args.chat is not None:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    engine = LLMEngine(loaded, engine_config)
    if jax.process_index() != 0:  # multi-host: process 0 generates, this one joins its calls
        engine.runner.follow()
        return 0
    engine.add_request("generate", prompt_ids, params)
    loaded_at = time.perf_counter()

    sent = ""
    num_tokens = 0
    first_token_at = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            completion = output.outputs[0]
            if completion.token_ids and first_token_at is None:
                first_token_at = time.perf_counter()
            num_tokens = len(completion.token_ids)
            sys.stdout.write(completion.text[len(sent):])
            sys.stdout.flush()
            sent = completion.text
    finished = time.perf_counter()
    sys.stdout.write("\n")
    first_token_at = first_token_at or finished
    decode_seconds = finished - first_token_at
    rate = (num_tokens - 1) / decode_seconds if num_tokens > 1 and decode_seconds > 0 else 0.0
    print(f"{num_tokens} tokens in {finished - loaded_at:.2f} s (prompt {len(prompt_ids)} tokens, "
          f"first token {first_token_at - loaded_at:.2f} s, {rate:.1f} tok/s after it; "
          f"load {loaded_at - started:.2f} s)", file=sys.stderr)
    return 0
