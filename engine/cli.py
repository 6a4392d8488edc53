"""The `balansis` command line.

Subcommands: `serve`, `generate`, `run-batch`, `convert`, `inspect`,
`bench`. Each subcommand's flags map one to one onto the parameters of the
code it calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.engine_args import add_engine_arguments


def _generate(args: argparse.Namespace) -> int:
    import jax

    from checkpoints.loader import load_model
    from engine.engine_args import engine_config_from_args
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
    started = time.perf_counter()
    engine_config = engine_config_from_args(args, max_num_seqs=1)
    loaded = load_model(args.model, mesh=engine_config.mesh())
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


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from checkpoints import orbax_dir
    from checkpoints.errors import CheckpointError
    from checkpoints.loader import load_model

    destination = Path(args.destination)
    if destination.exists() and not args.overwrite:  # before minutes of loading
        raise CheckpointError(f"{destination}: already exists (pass --overwrite to replace it)")
    started = time.perf_counter()
    loaded = load_model(args.source, dtype=orbax_dir.DTYPES[args.dtype])
    orbax_dir.save(loaded.model, loaded.tokenizer, destination, source=str(Path(args.source).absolute()),
                   overwrite=args.overwrite)
    print(f"{destination}: {loaded.config.model_type}, {args.dtype}, written in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from checkpoints.inspect_model import describe, format_description

    description = describe(Path(args.path))
    print(json.dumps(description, indent=2) if args.json else format_description(description))
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

    convert = commands.add_parser(
        "convert", help="convert an HF safetensors folder or a GGUF file into an Orbax checkpoint folder")
    convert.add_argument("source", help="GGUF file, HF safetensors folder or Orbax checkpoint folder")
    convert.add_argument("destination", help="the new checkpoint folder (must not exist)")
    convert.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                         help="dtype of the stored weights (default: %(default)s)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an existing destination (once the new one is complete)")
    convert.set_defaults(handler=_convert)

    inspect = commands.add_parser("inspect", help="architecture, parameter count, dtypes and sizes of a "
                                                  "checkpoint (any supported format)")
    inspect.add_argument("path", help="GGUF file, HF safetensors folder or Orbax checkpoint folder")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    inspect.set_defaults(handler=_inspect)

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
    from engine import distributed

    try:
        if hasattr(args, "num_processes"):  # the engine's subcommands: join a multi-host group first
            distributed.initialize(distributed.process_group(args))
        return args.handler(args)
    except (CheckpointError, ValueError) as e:
        print(f"balansis: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
