"""Precision levels (standard / high / ultra): logit error against float64, and throughput.

    python -m bench.numerics                          # SmolLM2 + a random Llama; 8 prompts × 16 tokens
    python -m bench.numerics --skip-throughput        # the logit errors only

Logit error: our whole-prompt logits at each level (`hidden_states` + `logits`,
one jitted call, weights passed as arguments) against HF transformers' forward
of the same weights in float64 throughout (`tests.hf_reference.float64_reference`:
`.double()` alone leaves HF's RMSNorm statistics, RoPE angles and softmax in
float32, which put a floor of ~1e-5 under every level's error); the largest
absolute difference over all positions and the vocabulary, and standard's error
over each level's. Models:
SmolLM2-135M-Instruct (its GGUF, dequantised by each side) on 3 fixed prompts;
a random Llama (hidden 256, 4 layers, GQA 4/2) on 3 random 40-token prompts;
and that random Llama with every weight rounded to bfloat16 (stored as
float32), where HIGH should be no worse than plain float32.

Throughput: SmolLM2 through the engine (`LLM.generate`), greedy, exactly
`--max-tokens` tokens per request (`ignore_eos`), one level at a time. Each
level first runs the same prompts reversed (same lengths, so the same bucketed
programs compile; the timed prompts miss the prefix cache), so compiling is not
timed. Results go to `bench/results/numerics-<UTC timestamp>.json`; tables are
printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results_file import RESULTS_DIR, write_report
from bench.throughput import machine_info, make_prompts, source_revision

SMOLLM2_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    return",
                   "Once upon a time, in a land far away, there lived")
RANDOM_LLAMA_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
RANDOM_PROMPT_TOKENS = 40


def reference_logits(hf_model, ids) -> np.ndarray:
    """HF's logits `[T, V]` of one whole sequence in float64."""
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([list(ids)])).logits[0].numpy()


def logit_errors(model, hf_model_float64, prompts: list[tuple[str, list[int]]]) -> list[dict]:
    """Per prompt: max |ours − float64| per level, and standard's error over each level's."""
    from model.numerics import Precision

    from tests.forward import logits_function

    ours = logits_function(model)
    rows = []
    for label, ids in prompts:
        reference = reference_logits(hf_model_float64, ids)
        errors = {p.value: float(np.abs(ours([ids], precision=p)[0] - reference).max()) for p in Precision}
        rows.append({"prompt": label, "tokens": len(ids), "max_abs_error": errors,
                     "standard_over_level": {level: errors["standard"] / e for level, e in errors.items()}})
    return rows


def smollm2_errors(loaded) -> list[dict]:
    import torch
    import transformers

    from tests.hf_reference import float64_reference

    path = loaded.path
    transformers.utils.logging.disable_progress_bar()  # GGUF dequantisation bars
    # Dequantised to a dense float64 model: with GGUF matmul kernels installed
    # (`kernels`), transformers would keep the blocks and multiply in float32.
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float64, local_files_only=True,
        quantization_config=transformers.GgufConfig(dequantize=True)).eval()
    if any(p.dtype != torch.float64 for p in hf_model.parameters()):
        raise RuntimeError("the reference is not a float64 model")
    hf_model = float64_reference(hf_model)
    prompts = [(text, loaded.tokenizer.encode(text)) for text in SMOLLM2_PROMPTS]
    return logit_errors(loaded.model, hf_model, prompts)


def random_llama_errors() -> tuple[list[dict], list[dict]]:
    """Errors of the random Llama, at its float32 weights and at bfloat16-rounded ones."""
    import torch

    from checkpoints.safetensors_dir import load_decoder
    from tests.hf_reference import float64_reference, save_tiny_model

    rng = np.random.default_rng(0)
    prompts = [(f"random #{i}", rng.integers(0, 256, RANDOM_PROMPT_TOKENS).tolist()) for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, rounded_folder = Path(tmp) / "f32", Path(tmp) / "bf16"
        hf_model = save_tiny_model("llama", folder, **RANDOM_LLAMA_SHAPE)
        _, model = load_decoder(folder)
        at_float32 = logit_errors(model, float64_reference(hf_model), prompts)

        # The same weights again (the first copy was converted in place),
        # rounded to bfloat16 and stored as float32.
        hf_model = save_tiny_model("llama", folder, **RANDOM_LLAMA_SHAPE)
        with torch.no_grad():
            for p in hf_model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        hf_model.save_pretrained(rounded_folder, safe_serialization=True)
        _, model = load_decoder(rounded_folder)
        at_bfloat16 = logit_errors(model, float64_reference(hf_model), prompts)
    return at_float32, at_bfloat16


def throughput(loaded, num_prompts: int, max_tokens: int, levels_asked=None) -> dict:
    """Output tokens/s per level through the engine, warm (compiling excluded), on this JAX backend."""
    from engine.llm import LLM
    from engine.llm_engine import EngineConfig
    from engine.sampling import SamplingParams
    from model.numerics import Precision

    prompt_ids = [loaded.tokenizer.encode(p) for p in make_prompts(num_prompts)]
    llm = LLM(loaded, config=EngineConfig(max_model_len=512, max_num_seqs=16))
    levels = {}
    for p in Precision:
        if levels_asked and p.value not in levels_asked and p is not Precision.STANDARD:
            continue
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, precision=p.value)
        started = time.perf_counter()
        llm.generate([list(reversed(ids)) for ids in prompt_ids], params)
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        outputs = llm.generate(prompt_ids, params)
        wall_s = time.perf_counter() - started
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        levels[p.value] = {"wall_s": wall_s, "warmup_s": warmup_s, "output_tokens": output_tokens,
                           "output_tokens_per_s": output_tokens / wall_s}
    for level in levels.values():
        level["slowdown_vs_standard"] = levels["standard"]["output_tokens_per_s"] / level["output_tokens_per_s"]
    import jax

    return {"prompts": num_prompts, "max_tokens": max_tokens, "max_num_seqs": 16, "backend": jax.default_backend(),
            "levels": levels}


def error_table(errors: dict[str, list[dict]]) -> str:
    lines = ["| model | prompt | tokens | standard | high | ultra | standard / high | standard / ultra |",
             "|---|---|---|---|---|---|---|---|"]
    for model_name, rows in errors.items():
        for row in rows:
            e, r = row["max_abs_error"], row["standard_over_level"]
            lines.append(f"| {model_name} | {row['prompt']!r} | {row['tokens']} | {e['standard']:.2e} | "
                         f"{e['high']:.2e} | {e['ultra']:.2e} | {r['high']:.2f} | {r['ultra']:.2f} |")
    return "\n".join(lines)


def throughput_table(result: dict) -> str:
    lines = ["| level | out tok/s | wall s | warm-up s | slowdown vs standard |", "|---|---|---|---|---|"]
    for level, r in result["levels"].items():
        lines.append(f"| {level} | {r['output_tokens_per_s']:.1f} | {r['wall_s']:.2f} | {r['warmup_s']:.1f} | "
                     f"{r['slowdown_vs_standard']:.2f}x |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from checkpoints.default_model import default_model_path
    from checkpoints.loader import load_model

    torch.set_num_threads(2)
    load_average_before, started, source = os.getloadavg(), time.perf_counter(), source_revision()
    loaded = load_model(args.model or default_model_path())
    errors = {}
    if not args.skip_errors:
        at_float32, at_bfloat16 = random_llama_errors()
        errors = {"SmolLM2-135M-Instruct": smollm2_errors(loaded), "random Llama": at_float32,
                  "random Llama, bf16 weights": at_bfloat16}
    report = {"benchmark": "numerics", "model": str(loaded.path), "source": source,
              "machine": machine_info(), "load_average_before": load_average_before, "logit_errors": errors}
    if not args.skip_throughput:
        report["throughput"] = throughput(loaded, args.num_prompts, args.max_tokens, args.levels)
    report["load_average_after"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - started
    path = write_report("numerics", report, args.results_dir)
    if errors:
        print("Max |logit − float64 logit| per level, and standard's error over each level's:\n")
        print(error_table(errors))
    if "throughput" in report:
        t = report["throughput"]
        print(f"\nSmolLM2 through the engine ({t['backend']}), {t['prompts']} prompts × {t['max_tokens']} tokens, "
              f"greedy:\n")
        print(throughput_table(t))
    print(f"\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--num-prompts", type=int, default=8, help="throughput: requests")
    # 16, not more: HIGH and ULTRA take seconds per step on 2 CPU cores.
    parser.add_argument("--max-tokens", type=int, default=16, help="throughput: new tokens per request, exactly")
    parser.add_argument("--skip-throughput", action="store_true", help="the logit errors only")
    parser.add_argument("--skip-errors", action="store_true", help="the throughput only")
    parser.add_argument("--levels", nargs="+", choices=["high", "ultra"], default=None,
                        help="throughput: these levels besides standard (default: both)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
