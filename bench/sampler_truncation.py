"""Top-k / top-p truncation: candidate tiers against the full vocabulary sort.

    python -m bench.sampler_truncation

On the default model's real next-token distributions (64 chat prompts, each
after 16 sampled tokens), times the sampler's truncation step as shipped
(`_top_k_top_p`: candidate tiers, the full sort only for rows no tier
decides) against the full sort for every row (`_sorted_top_k_top_p`, what
the sampler did before), at several (temperature, top_p) settings, and
checks that both keep exactly the same tokens. Results go to
`bench/results/sampler_truncation-<UTC timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.results_file import write_report

SETTINGS = ((0.7, 0.9), (1.0, 0.9), (1.0, 0.95))  # (temperature, top_p)


def _next_token_logits(num_prompts: int) -> np.ndarray:
    from engine.llm import LLM
    from engine.llm_engine import EngineConfig
    from engine.sampling import SamplingParams
    from tests.forward import logits_function

    llm = LLM(config=EngineConfig(max_num_seqs=num_prompts))
    topics = ["the sea", "a cat", "Paris", "numbers", "rain", "a robot", "music", "winter"]
    prompts = [[{"role": "user", "content": f"Write a sentence about {topics[i % 8]}, variant {i // 8}."}]
               for i in range(num_prompts)]
    outputs = llm.chat(prompts, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=16, seed=1))
    logits = logits_function(llm.engine.loaded.model)
    # The distribution of the token after each prompt and its 16 sampled tokens.
    return np.stack([logits([output.prompt_ids + output.outputs[0].token_ids])[0, -1].astype(np.float32)
                     for output in outputs])


def _time_ms(fn, repeats: int = 5) -> float:
    fn().block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn().block_until_ready()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main(num_prompts: int = 64) -> dict:
    from engine import sampler

    logits_bv = _next_token_logits(num_prompts)
    b = logits_bv.shape[0]
    tiered = jax.jit(sampler._top_k_top_p)
    full_sort = jax.jit(sampler._sorted_top_k_top_p)
    results = []
    for temperature, top_p in SETTINGS:
        scaled_bv = jnp.asarray(logits_bv / temperature)
        k_b = jnp.full((b,), scaled_bv.shape[-1], jnp.int32)  # no top-k
        top_k_b = jnp.zeros((b,), jnp.int32)
        p_b = jnp.full((b,), top_p, jnp.float32)
        truncated_b = jnp.ones((b,), bool)
        ours = tiered(scaled_bv, top_k_b, p_b, truncated_b)
        reference = full_sort(scaled_bv, k_b, p_b)
        nucleus_b = np.isfinite(np.asarray(reference)).sum(-1)
        results.append({
            "temperature": temperature, "top_p": top_p,
            "tiers_ms": _time_ms(lambda: tiered(scaled_bv, top_k_b, p_b, truncated_b)),
            "full_sort_ms": _time_ms(lambda: full_sort(scaled_bv, k_b, p_b)),
            "same_kept_tokens": bool(np.array_equal(np.isfinite(np.asarray(ours)), np.isfinite(np.asarray(reference)))),
            "nucleus_median": int(np.median(nucleus_b)), "nucleus_max": int(nucleus_b.max()),
            "rows_beyond_tiers": {str(t): int((nucleus_b > t).sum()) for t in sampler.TRUNCATION_TIERS},
        })
    report = {"benchmark": "sampler_truncation", "rows": b, "vocab_size": int(logits_bv.shape[-1]),
              "tiers": list(sampler.TRUNCATION_TIERS), "cpus": os.cpu_count(), "jax": jax.__version__,
              "backend": jax.default_backend(), "load_average": os.getloadavg(), "results": results}
    write_report("sampler_truncation", report)
    print("| temperature | top_p | tiers ms | full sort ms | speed-up | same tokens | nucleus median / max |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['temperature']} | {r['top_p']} | {r['tiers_ms']:.1f} | {r['full_sort_ms']:.1f} | "
              f"{r['full_sort_ms'] / r['tiers_ms']:.1f}x | {r['same_kept_tokens']} | "
              f"{r['nucleus_median']} / {r['nucleus_max']} |")
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
