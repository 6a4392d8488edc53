"""The `balansis` command line, assembled from each layer's subcommands.

    balansis serve | run-batch      (serving: the server, and OpenAI batch files offline)
    balansis generate               (engine: one prompt, streamed to stdout)
    balansis convert | inspect      (checkpoints)
    balansis keys | db              (serving: API keys in the store, its schema)

Every flag can also come from the environment: `--max-num-seqs` from
BALANSIS_MAX_NUM_SEQS (serving.environment_flags).

Each layer defines its own subcommands (flags and handler) next to the code
they call, the flags mapping one to one onto its parameters; this top floor
only assembles them, so no lower layer imports upward to reach a command.
"""

from __future__ import annotations

import argparse
import os
import sys

from checkpoints import commands as checkpoint_commands
from engine import generate
from serving import batch_jobs, keys_command, server
from serving.environment_flags import with_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balansis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    subcommands = (
        ("generate", "generate text from a prompt or a chat message", generate.add_arguments,
         generate.generate_command),
        ("serve", "serve the OpenAI-compatible API (and the seed API) over HTTP", server.add_arguments,
         server.serve_command),
        ("run-batch", "run an OpenAI Batch API input file offline", batch_jobs.add_arguments,
         batch_jobs.run_batch_command),
        ("convert", "convert an HF safetensors folder or a GGUF file into an Orbax checkpoint folder",
         checkpoint_commands.add_convert_arguments, checkpoint_commands.convert_command),
        ("inspect", "architecture, parameter count, dtypes and sizes of a checkpoint (any supported format)",
         checkpoint_commands.add_inspect_arguments, checkpoint_commands.inspect_command),
        ("keys", "create, list and revoke API keys in the server's database", keys_command.add_keys_arguments,
         keys_command.keys_command),
        ("db", "the server's database: apply schema migrations", keys_command.add_db_arguments,
         keys_command.db_command),
    )
    for name, summary, add_arguments, handler in subcommands:
        subparser = commands.add_parser(name, help=summary)
        add_arguments(subparser)
        subparser.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = with_environment(parser, sys.argv[1:] if argv is None else argv, os.environ)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    # Never contact a model hub: every file is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from checkpoints.errors import CheckpointError
    from engine import distributed, memory

    memory.configure_preallocation()  # before any device is used

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
