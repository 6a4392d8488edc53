"""`balansis convert` and `balansis inspect`: the checkpoint layer's subcommands.

    balansis convert model.gguf model-orbax/ [--dtype bf16] [--overwrite]
    balansis inspect model-orbax/ [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="GGUF file, HF safetensors folder or Orbax checkpoint folder")
    parser.add_argument("destination", help="the new checkpoint folder (must not exist)")
    parser.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                        help="dtype of the stored weights (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing destination (once the new one is complete)")


def convert_command(args: argparse.Namespace) -> int:
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


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="GGUF file, HF safetensors folder or Orbax checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a summary")


def inspect_command(args: argparse.Namespace) -> int:
    from checkpoints.inspect_model import describe, format_description

    description = describe(Path(args.path))
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    return 0
