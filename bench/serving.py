"""Online serving: concurrent streaming clients against an OpenAI-compatible server.

    python -m bench.serving                          # balansis serve, then each installed peer
    python -m bench.serving --url http://host:8080/v1 --model NAME   # any OpenAI-compatible server
    python -m bench.serving --quantizations none int8 int8-dynamic  # balansis once per weight format

For each concurrency C (default 1, 4, 16, 64), C clients each stream `--requests-per-client`
chat completions of exactly `--max-tokens` tokens (`ignore_eos`, greedy) through the
official `openai` SDK, one after the other. Measured per request at the client: time to
first token, inter-token latency (between content chunks), end-to-end latency; per level:
output tokens per second over the level's wall time. A warm-up request per level runs
first, so compile time is not counted. Results go to
`bench/results/serving-<UTC timestamp>.json`; a table is printed.

Peers, in the same invocation, one server at a time on the same machine (bench/servers.py):
vLLM's CPU backend (`../shared/peers/vllm-cpu/install.sh`) and llama.cpp's `llama-server`
on the same GGUF (`bash bench/peers/build_llama_server.sh`), each when installed; the table
ends with our output tok/s over each peer's. Any OpenAI-compatible URL (`--url`) runs the
same load alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from bench import servers
from bench.results_file import RESULTS_DIR, write_report

PROMPTS = ["Tell me a story about a lighthouse keeper.", "Explain how rain forms.",
           "Describe a walk through a forest in autumn.", "Write about the history of bread.",
           "What makes a good friend?", "Describe the sea at night.", "How do bees make honey?",
           "Write a letter to a future city."]


async def _one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first, last, gaps, num_tokens = None, None, [], 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    ended = time.perf_counter()
    return {"ttft_s": (first or ended) - started, "e2e_s": ended - started, "gaps_s": gaps,
            "completion_tokens": num_tokens}


async def _level(url: str, model: str, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                                  max_retries=0, timeout=3600) as client:
        await _one_request(client, model, PROMPTS[0], max_tokens)  # warm-up: compiles this level's shapes

        async def client_loop(i: int) -> list[dict]:
            return [await _one_request(client, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
                    for j in range(requests_per_client)]

        started = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    requests = [r for rs in per_client for r in rs]
    gaps = sorted(g for r in requests for g in r["gaps_s"])
    ttfts = sorted(r["ttft_s"] for r in requests)
    total_tokens = sum(r["completion_tokens"] for r in requests)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    return {"concurrency": concurrency, "requests": len(requests), "output_tokens": total_tokens,
            "wall_s": wall, "output_tok_per_s": total_tokens / wall,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99),
            "e2e_mean_s": statistics.mean(r["e2e_s"] for r in requests)}


def _run_levels(url: str, model: str, args) -> list[dict]:
    return [asyncio.run(_level(url, model, c, args.requests_per_client, args.max_tokens)) for c in args.concurrency]


def main(args: argparse.Namespace) -> int:
    runs = []
    if args.url is not None:
        import openai

        model = args.model or openai.OpenAI(base_url=args.url, api_key="none").models.list().data[0].id
        runs.append({"system": args.url, "model": model, "levels": _run_levels(args.url, model, args)})
    else:
        systems = args.systems or ["balansis", *(p for p in servers.PEERS if servers.is_installed(p))]
        # balansis once per --quantizations entry ("balansis", "balansis int8", …), then the peers.
        starts = [(name, ()) for name in systems if name != "balansis"]
        if "balansis" in systems:
            starts[:0] = [("balansis" if q == "none" else f"balansis {q}", ("--quantization", q))
                          for q in args.quantizations]
        for label, extra_args in starts:
            name = label.split()[0]
            if not servers.is_installed(name):
                raise SystemExit(f"{name} is not installed (see bench/servers.py)")
            print(f"-- {label}", flush=True)
            server = servers.start(name, max_streams=max(args.concurrency), server_model=args.server_model,
                                   extra_args=extra_args,
                                   log_path=Path(args.results_dir) / f"serving-{label.replace(' ', '-')}.log")
            try:
                runs.append({"system": label, "model": server.model, "ready_s": server.ready_s,
                             "levels": _run_levels(server.api_url, server.model, args)})
            finally:
                server.stop()
    report = {"benchmark": "serving", "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "runs": runs}
    path = write_report("serving", report, results_dir=Path(args.results_dir))
    print("| system | streams | requests | output tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["levels"]:
            print(f"| {run['system']} | {r['concurrency']} | {r['requests']} | {r['output_tok_per_s']:.1f} | "
                  f"{r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['itl_p50_s'] * 1000:.1f} | "
                  f"{r['itl_p99_s'] * 1000:.1f} |")
    ours = [run for run in runs if run["system"].startswith("balansis")]
    peers = [run for run in runs if run not in ours]
    if ours and peers:
        columns = [(o, p) for o in ours for p in peers]
        print("\n| streams | " + " | ".join(f"{o['system']} / {p['system']}" for o, p in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for i, level in enumerate(ours[0]["levels"]):
            ratios = [o["levels"][i]["output_tok_per_s"] / p["levels"][i]["output_tok_per_s"] for o, p in columns]
            print(f"| {level['concurrency']} | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    print(f"\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="an OpenAI-compatible base URL to measure instead of starting "
                                                    "servers")
    parser.add_argument("--systems", nargs="+", choices=("balansis", *servers.PEERS), default=None,
                        help="servers to start, one after the other (default: balansis and every installed peer)")
    parser.add_argument("--quantizations", nargs="+", choices=("none", "int8", "int8-dynamic"), default=["none"],
                        help="start balansis once per weight format (--quantization; default: none)")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    parser.add_argument("--server-model", default=None, help="--model of the started server (default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes (default: %(default)s)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
