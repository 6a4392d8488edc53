"""The `balansis` command line.

Subcommands: `serve`, `generate`, `run-batch`, `bench`; `convert` and
`inspect` come with later work. Each subcommand's flags map one
to one onto the parameters of the code it calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.engine_args import add_engine_arguments


def _generate(args: argparse.Namespace) -> int:
    from checkpoints.loader import load_model
    from engine.engine_args import engine_config_from_args
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    started = time.perf_counter()
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    if args.chat is not None:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.chat}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    engine = LLMEngine(loaded, engine_config_from_args(args, max_num_seqs=1))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balansis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt or a chat message")
    gen.add_argument("--model", default=None,
                     help="GGUF file or HF safetensors folder (default: SmolLM2-135M-Instruct Q4_1)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="raw text to continue")
    prompt.add_argument("--chat", help="a user message, formatted with the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_engine_arguments(gen)
    gen.set_defaults(handler=_generate)

    from serving import server

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API (and the seed API) over HTTP")
    server.add_arguments(serve)
    serve.set_defaults(handler=server.serve_command)

    from engine import batch_jobs

    batch = commands.add_parser("run-batch", help="run an OpenAI Batch API input file offline")
    batch_jobs.add_arguments(batch)
    batch.set_defaults(handler=batch_jobs.run_batch_command)

    from bench import throughput

    bench = commands.add_parser("bench", help="benchmarks (results as JSON under bench/results/)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    tp = benchmarks.add_parser("throughput", help="offline throughput against HF transformers")
    throughput.add_arguments(tp)
    tp.set_defaults(handler=throughput.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Never contact a model hub: every file is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from checkpoints.errors import CheckpointError

    try:
        return args.handler(args)
    except (CheckpointError, ValueError) as e:
        print(f"balansis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
