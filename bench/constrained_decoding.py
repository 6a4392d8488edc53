"""The cost of constrained decoding per decode step, at a full batch.

    python -m bench.constrained_decoding                 # SmolLM2, 64 sequences, 3 rounds
    python -m bench.constrained_decoding --num-seqs 16 --rounds 5
    python -m bench.constrained_decoding --modes free   # only the free steps (e.g. on an older checkout)

One engine (the default model, float32, as `balansis serve` runs it on a CPU) decodes
`--num-seqs` sequences at once, first free, then each under a JSON schema (an object with a
string of at least 300 characters and an enum, so every sequence generates to max_tokens), in
alternating rounds. Timed:
every `engine.step()` in which all sequences decode, and apart from it the grammar's share,
filling the 64 masks (`GrammarCompiler.fill_masks`) and advancing the matchers by one token.
Reported: median and mean step per mode, the overhead ratio, and the mask and advance times.
Results go to `bench/results/constrained_decoding-<UTC timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.results_file import write_report
from bench.throughput import machine_info, source_revision

# The title's minimum length keeps every sequence generating to max_tokens, so both modes time the
# same positions.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 300, "maxLength": 400},
    "mood": {"enum": ["happy", "sad", "curious"]}}, "required": ["title", "mood"], "additionalProperties": False}
MAX_TOKENS = 48


def _decode_steps(engine, prompts, params) -> list[float]:
    """Seconds of each step in which every sequence decoded (no prefill, none finished yet)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{id(params)}-{i}", prompt, params)
    times = []
    while engine.has_unfinished_requests():
        stats = engine.stats()
        started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - started
        if stats.num_running == len(prompts) and stats.num_waiting == 0 and not any(o.finished for o in outputs):
            times.append(elapsed)
    return times[1:]  # the first full step still carries prompt work


def _grammar_share(engine, constraint, num_seqs: int, num_steps: int = 30) -> tuple[float, float]:
    """Median seconds to fill `num_seqs` masks, and to advance `num_seqs` matchers one token."""
    compiler = engine.grammars
    matchers = [compiler.matcher(constraint) for _ in range(num_seqs)]
    fills, advances = [], []
    tokenizer = engine.tokenizer
    text = tokenizer.encode('{"title":"' + "a long and winding title " * 20, add_special_tokens=False)
    for token in text[:num_steps]:
        started = time.perf_counter()
        compiler.fill_masks([(m, row) for row, m in enumerate(matchers)], num_seqs)
        fills.append(time.perf_counter() - started)
        started = time.perf_counter()
        for matcher in matchers:
            matcher.consume_token(token)
        advances.append(time.perf_counter() - started)
    return float(np.median(fills)), float(np.median(advances))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=("free", "constrained"), default=("free", "constrained"))
    args = parser.parse_args(argv)

    from checkpoints.loader import load_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    loaded = load_model()
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.num_seqs, max_model_len=512, warmup=True))
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": f"Give story {i} a title, as JSON."}])
               for i in range(args.num_seqs)]
    params = {"free": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1, ignore_eos=True)}
    if "constrained" in args.modes:
        from engine.sampling import Constraint
        constraint = Constraint("json_schema", json.dumps(SCHEMA))
        params["constrained"] = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1, constraint=constraint)
    _decode_steps(engine, prompts, params[args.modes[-1]])  # warms the path (and builds the grammar compiler)
    steps = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            steps[mode] += _decode_steps(engine, prompts, params[mode])
    fill = advance = None
    if "constrained" in args.modes:
        fill, advance = _grammar_share(engine, constraint, args.num_seqs)

    summary = {mode: {"steps": len(t), "median_ms": 1e3 * float(np.median(t)), "mean_ms": 1e3 * float(np.mean(t))}
               for mode, t in steps.items()}
    overhead = (summary["constrained"]["median_ms"] / summary["free"]["median_ms"] - 1
                if set(args.modes) == {"free", "constrained"} else None)
    report = {"benchmark": "constrained_decoding", "num_seqs": args.num_seqs, "schema": SCHEMA,
              "summary": summary, "overhead_median": overhead,
              "fill_masks_ms": None if fill is None else 1e3 * fill,
              "advance_matchers_ms": None if advance is None else 1e3 * advance,
              "machine": machine_info(), "revision": source_revision()}
    path = write_report("constrained_decoding", report)
    print(f"| decode step, {args.num_seqs} sequences | steps | median | mean |")
    print("|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['steps']} | {s['median_ms']:.1f} ms | {s['mean_ms']:.1f} ms |")
    if overhead is not None:
        print(f"\noverhead (median): {100 * overhead:+.1f}%; filling {args.num_seqs} masks {1e3 * fill:.2f} ms, "
              f"advancing {args.num_seqs} matchers {1e3 * advance:.2f} ms")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
