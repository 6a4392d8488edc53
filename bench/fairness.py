"""Fairness across precision levels: a STANDARD stream's inter-token latency alone and beside an ULTRA one.

    python -m bench.fairness                     # SmolLM2, 128 STANDARD tokens; shares 0.25 (default) and 1
    python -m bench.fairness --shares 0.1 0.25 0.5 1

One engine (the default model, float32, as `balansis serve` runs it on a
CPU) is driven step by step, as the server's engine thread drives it; each
STANDARD token's arrival time is taken when its step returns. Scenarios:
the STANDARD request alone, then for each `--shares` value
(`--high-precision-share`; 1 is no limit: every step runs both levels'
calls, what the engine did before the share existed) the same request
started after an ULTRA request's prompt has run, the ULTRA request
generating throughout. Both programs of both levels are compiled before
anything is timed, at every length the timed runs reach (a new page count
compiles a new ULTRA program). Reported: the STANDARD stream's time to first
token and inter-token gaps (mean, p50, p99, max) and their ratio to alone,
and the ULTRA tokens made meanwhile.
Results go to `bench/results/fairness-<UTC timestamp>.json`; a table is
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.results_file import RESULTS_DIR, write_report
from bench.throughput import machine_info, source_revision

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _stream(engine, prompt_ids, params, *, beside=None) -> dict:
    """Run the STANDARD request to its end (the `beside` request, if any, already running); the
    gaps between its tokens and the tokens `beside` made meanwhile."""
    started = time.perf_counter()
    engine.add_request("standard", prompt_ids, params)
    arrivals, last_count, beside_tokens = [], 0, 0
    while True:
        outputs = {o.request_id: o for o in engine.step()}
        now = time.perf_counter()
        if beside in outputs:
            beside_tokens += 1  # one ULTRA decode per step it runs in
        output = outputs.get("standard")
        if output is None:
            continue
        count = len(output.outputs[0].token_ids)
        arrivals += [now] * (count - last_count)
        last_count = count
        if output.finished:
            break
    gaps_ms = np.diff(np.array(arrivals)) * 1000
    return {"tokens": len(arrivals), "wall_s": time.perf_counter() - started,
            "ttft_ms": (arrivals[0] - started) * 1000,
            "itl_mean_ms": float(gaps_ms.mean()), "itl_p50_ms": float(np.percentile(gaps_ms, 50)),
            "itl_p99_ms": float(np.percentile(gaps_ms, 99)), "itl_max_ms": float(gaps_ms.max()),
            "ultra_tokens_meanwhile": beside_tokens if beside else None}


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def run(args: argparse.Namespace) -> dict:
    from checkpoints.default_model import default_model_path
    from checkpoints.loader import load_model
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.precision_share import PrecisionShare
    from engine.sampling import SamplingParams

    loaded = load_model(args.model or default_model_path())
    engine = LLMEngine(loaded, EngineConfig(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=256))
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    standard = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    ultra = SamplingParams(max_tokens=1000 - len(prompt_ids), temperature=0, ignore_eos=True, precision="ultra")
    compile_started = time.perf_counter()
    # Compile both levels' prefill and decode programs at batch 1 and every page count the timed runs
    # reach: the STANDARD stream's length, and ULTRA's beside it when nothing defers it.
    engine.add_request("warm-standard", prompt_ids, standard)
    _drain(engine)
    engine.add_request("warm-ultra", prompt_ids, SamplingParams(
        max_tokens=args.max_tokens + 4, temperature=0, ignore_eos=True, precision="ultra"))
    _drain(engine)
    compile_s = time.perf_counter() - compile_started
    scenarios = {"alone": _stream(engine, prompt_ids, standard)}
    for share in args.shares:
        engine.precision_share = PrecisionShare(share)
        engine.add_request("ultra", prompt_ids, ultra)
        engine.step()  # the ULTRA prompt runs; then it decodes beside the STANDARD stream
        scenarios[f"beside ultra, share {share:g}"] = _stream(engine, prompt_ids, standard, beside="ultra")
        engine.abort_request("ultra")
    alone = scenarios["alone"]
    for result in scenarios.values():
        result["itl_mean_vs_alone"] = result["itl_mean_ms"] / alone["itl_mean_ms"]
        result["itl_p50_vs_alone"] = result["itl_p50_ms"] / alone["itl_p50_ms"]
    return {"model": str(loaded.path), "standard_tokens": args.max_tokens, "compile_s": compile_s,
            "scenarios": scenarios}


def table(result: dict) -> str:
    lines = ["| scenario | STANDARD TTFT ms | ITL mean ms | p50 | p99 | max | mean vs alone | p50 vs alone | "
             "ULTRA tokens meanwhile |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["scenarios"].items():
        ultra = "—" if r["ultra_tokens_meanwhile"] is None else str(r["ultra_tokens_meanwhile"])
        lines.append(f"| {name} | {r['ttft_ms']:.0f} | {r['itl_mean_ms']:.1f} | {r['itl_p50_ms']:.1f} | "
                     f"{r['itl_p99_ms']:.1f} | {r['itl_max_ms']:.1f} | {r['itl_mean_vs_alone']:.2f}× | "
                     f"{r['itl_p50_vs_alone']:.2f}× | {ultra} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    load_average_before, started, source = os.getloadavg(), time.perf_counter(), source_revision()
    result = run(args)
    report = {"benchmark": "fairness", "source": source, "machine": machine_info(),
              "load_average_before": load_average_before, **result, "load_average_after": os.getloadavg(),
              "total_s": time.perf_counter() - started}
    path = write_report("fairness", report, args.results_dir)
    print(f"A STANDARD stream of {args.max_tokens} tokens (greedy), alone and beside an ULTRA stream:\n")
    print(table(result))
    print(f"\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--max-tokens", type=int, default=128, help="the STANDARD stream's tokens")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0],
                        help="--high-precision-share values to run beside ULTRA (1: no limit)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
