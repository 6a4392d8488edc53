"""Offline throughput: N prompts × M new tokens through our engine and through
HF transformers' `generate`, in the same process, on the same token ids.

    python -m bench.throughput                       # 64 prompts × 128 tokens
    python -m bench.throughput --num-prompts 16 --max-tokens 32 --skip-hf

What is timed (shared/DESIGN.md, "Measuring"):

- ours: `LLM.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=M,
  min_tokens=M))` — continuous batching, every request exactly M tokens, EOS
  banned until then as HF's `min_new_tokens` does (`--eos ignore` uses
  `ignore_eos=True` instead: EOS may be drawn and generation goes on).
  A warm-up run of the same shape comes first, so the timed run compiles
  nothing; its prompts are the timed ones reversed (same lengths, so the same
  bucketed programs) so the timed run finds nothing in the prefix cache.
  Warm-up minus timed wall time is reported as the compile estimate.
- HF: `model.generate` on torch CPU, float32, `torch.set_num_threads` = the
  CPUs XLA uses, static batches of `--batch-size` left-padded prompts, greedy,
  `min_new_tokens = max_new_tokens = M` (so EOS cannot end a row early and
  both produce the same number of tokens). One tiny generate warms it up.

Model loading is timed separately and never counted. `--repeats R` times each
system R times and keeps the fastest (the machine is shared: the JSON keeps
every repeat and the load average before and after). Greedy outputs of the
two systems are compared as a sanity check (`greedy_agreement`). Results go to
`bench/results/throughput-<UTC timestamp>.json` and
`bench/results/throughput-latest.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from bench.results_file import RESULTS_DIR, write_report

# Short, varied prompts: subjects × instructions, cycled. Plain text (no
# chat template), a handful of tokens each, like the peers in DESIGN.md.
_SUBJECTS = ("the sea", "a lighthouse", "the moon", "an old library", "a mountain village",
             "the first computer", "a thunderstorm", "a city at night", "honey bees",
             "the Roman empire", "a robot learning to paint", "autumn leaves", "a desert train",
             "the speed of light", "a chess match", "the history of bread")
_INSTRUCTIONS = ("Write a short story about {}.", "Explain {} to a child.",
                 "Describe {} in three sentences.", "List five facts about {}.")


def make_prompts(num_prompts: int) -> list[str]:
    """`num_prompts` distinct-as-possible short prompts, deterministic."""
    prompts = []
    for i in range(num_prompts):
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        instruction = _INSTRUCTIONS[(i // len(_SUBJECTS)) % len(_INSTRUCTIONS)]
        prompts.append(instruction.format(subject))
    return prompts


@dataclasses.dataclass(slots=True)
class RunResult:
    system: str
    wall_s: float
    num_requests: int
    num_output_tokens: int
    num_prompt_tokens: int
    load_s: float
    warmup_s: float | None = None
    compile_s: float | None = None  # warm-up wall time minus timed wall time
    all_wall_s: list[float] = dataclasses.field(default_factory=list)  # every timed repeat; wall_s is the least
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "output_tokens_per_s": self.output_tokens_per_s,
                "requests_per_s": self.requests_per_s}


def cpu_threads() -> int:
    """CPUs this process may run on: what XLA's CPU thread pool uses."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- ours -----------------------------------------------------------------------------
def sampling_params(max_tokens: int, eos: str):
    """Greedy, exactly `max_tokens` tokens per request.

    eos="ban": EOS may not be drawn before `max_tokens` tokens (min_tokens), the
    rule HF's `min_new_tokens` applies, so both systems pick the same tokens and
    their greedy outputs can be compared. eos="ignore": EOS may be drawn and
    generation goes on past it (vLLM's ignore_eos); HF has no equivalent.
    """
    from engine.sampling import SamplingParams

    if eos == "ban":
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_ours(loaded, prompt_ids: list[list[int]], max_tokens: int, *, max_num_seqs: int,
             max_num_batched_tokens: int, max_model_len: int, eos: str = "ban",
             repeats: int = 1) -> tuple[RunResult, list[list[int]]]:
    """`loaded`: a `checkpoints.loader.LoadedModel`. Building the engine counts as loading."""
    from engine.llm import LLM
    from engine.llm_engine import EngineConfig

    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=max_model_len)
    params = sampling_params(max_tokens, eos)
    started = time.perf_counter()
    llm = LLM(loaded, config=config)
    load_s = time.perf_counter() - started

    # Same lengths, so the warm-up compiles exactly the programs the timed run
    # uses; reversed, so the timed prompts are not in the prefix cache.
    started = time.perf_counter()
    llm.generate([list(reversed(ids)) for ids in prompt_ids], params)
    warmup_s = time.perf_counter() - started

    walls, output_ids = [], None
    for repeat in range(repeats):
        if repeat:
            # A fresh engine (empty prefix cache); compiled programs are shared.
            llm = LLM(loaded, config=config)
        started = time.perf_counter()
        outputs = llm.generate(prompt_ids, params)
        walls.append(time.perf_counter() - started)
        output_ids = [list(o.outputs[0].token_ids) for o in outputs]
        if any(len(ids) != max_tokens for ids in output_ids):
            raise RuntimeError("our engine produced a different number of tokens than asked")
    result = RunResult(
        system="balansis", wall_s=min(walls), num_requests=len(prompt_ids),
        num_output_tokens=sum(map(len, output_ids)), num_prompt_tokens=sum(map(len, prompt_ids)),
        load_s=load_s, warmup_s=warmup_s, compile_s=max(0.0, warmup_s - min(walls)), all_wall_s=walls,
        settings=dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      max_model_len=max_model_len, block_size=config.block_size,
                      num_kv_blocks=llm.engine.num_blocks, eos=eos))
    return result, output_ids


# -- HF transformers ----------------------------------------------------------------------
def run_hf(model_path: Path, prompt_ids: list[list[int]], max_tokens: int, *, batch_size: int,
           num_threads: int, pad_token_id: int, repeats: int = 1) -> tuple[RunResult, list[list[int]]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    torch.set_num_threads(num_threads)
    transformers.utils.logging.disable_progress_bar()  # GGUF dequantisation bars
    started = time.perf_counter()
    if model_path.is_dir():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32, local_files_only=True)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32, local_files_only=True)
    model.eval()
    load_s = time.perf_counter() - started

    def generate(batch: list[list[int]], num_tokens: int) -> list[list[int]]:
        width = max(map(len, batch))
        # Left padding: every row's last prompt token sits in the same column,
        # so the batch decodes in lockstep, as `generate` expects.
        input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                 pad_token_id=pad_token_id)
        return [row[width:].tolist() for row in out]

    started = time.perf_counter()
    generate(prompt_ids[:1], 2)
    warmup_s = time.perf_counter() - started

    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        output_ids = []
        for i in range(0, len(prompt_ids), batch_size):
            output_ids.extend(generate(prompt_ids[i:i + batch_size], max_tokens))
        walls.append(time.perf_counter() - started)
        if any(len(ids) != max_tokens for ids in output_ids):
            raise RuntimeError("HF generate produced a different number of tokens than asked")
    result = RunResult(
        system="hf-transformers", wall_s=min(walls), num_requests=len(prompt_ids),
        num_output_tokens=sum(map(len, output_ids)), num_prompt_tokens=sum(map(len, prompt_ids)),
        load_s=load_s, warmup_s=warmup_s, all_wall_s=walls,
        settings=dict(batch_size=batch_size, num_threads=num_threads, dtype="float32"))
    return result, output_ids


# -- report --------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_revision() -> str | None:
    """The checkout's commit, with "+dirty" when files differ from it: the engine changes fast."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict:
    import jax

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        platform=platform.platform(), python=platform.python_version(), cpu_model=cpu_model,
        cpu_count=os.cpu_count(), cpu_threads=cpu_threads(),
        jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
        versions={d: _version(d) for d in ("jax", "jaxlib", "flax", "torch", "transformers", "gguf")},
        xla_flags=os.environ.get("XLA_FLAGS"))


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far the greedy outputs agree: a sanity check, not a speed figure
    (float32 rounding differs, so long greedy runs may part ways)."""
    prefixes = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    return dict(num_identical=sum(a == b for a, b in zip(ours, theirs)),
                mean_common_prefix_tokens=sum(prefixes) / max(len(prefixes), 1))


def format_table(results: list[RunResult], ratio: float | None) -> str:
    header = ("system", "requests", "out tokens", "wall s", "out tok/s", "req/s", "load s",
              "warm-up s", "compile s")
    rows = [header]
    for r in results:
        rows.append((r.system, str(r.num_requests), str(r.num_output_tokens), f"{r.wall_s:.2f}",
                     f"{r.output_tokens_per_s:.1f}", f"{r.requests_per_s:.3f}", f"{r.load_s:.1f}",
                     "-" if r.warmup_s is None else f"{r.warmup_s:.1f}",
                     "-" if r.compile_s is None else f"{r.compile_s:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if ratio is not None:
        lines.append(f"\nours / HF output tokens/s: {ratio:.2f}x")
    return "\n".join(lines)


def write_results(report: dict, results_dir: Path = RESULTS_DIR) -> Path:
    path = write_report("throughput", report, results_dir)
    (results_dir / "throughput-latest.json").write_text(path.read_text())
    return path


# -- command line ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="GGUF file or HF safetensors folder (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request, exactly")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="HF static batch size (default: all prompts in one batch)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="ours: sequences running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512, help="ours: token budget of a step")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="ours: KV length per sequence (default: longest prompt + max tokens)")
    parser.add_argument("--eos", choices=("ban", "ignore"), default="ban",
                        help="ours: ban EOS until max tokens (min_tokens, as HF's min_new_tokens; default) "
                             "or ignore it (ignore_eos)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per system; the fastest counts")
    parser.add_argument("--skip-hf", action="store_true", help="run only our engine")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never contact a model hub
    from checkpoints.default_model import default_model_path
    from checkpoints.loader import load_model

    if min(args.num_prompts, args.max_tokens, args.repeats) < 1:
        raise ValueError("--num-prompts, --max-tokens and --repeats must be at least 1")
    model_path = Path(args.model) if args.model else default_model_path()
    load_avg_before = os.getloadavg()

    started = time.perf_counter()
    loaded = load_model(model_path)
    load_s = time.perf_counter() - started
    tokenizer = loaded.tokenizer
    prompts = make_prompts(args.num_prompts)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    max_model_len = args.max_model_len or max(map(len, prompt_ids)) + args.max_tokens

    ours, ours_ids = run_ours(loaded, prompt_ids, args.max_tokens, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=max_model_len, eos=args.eos, repeats=args.repeats)
    ours.load_s += load_s
    print(f"balansis: {ours.output_tokens_per_s:.1f} out tok/s (warm-up {ours.warmup_s:.1f} s)",
          file=sys.stderr, flush=True)
    results = [ours]
    ratio = agreement = None
    if not args.skip_hf:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        hf, hf_ids = run_hf(model_path, prompt_ids, args.max_tokens,
                            batch_size=args.batch_size or args.num_prompts,
                            num_threads=cpu_threads(), pad_token_id=pad, repeats=args.repeats)
        results.append(hf)
        ratio = ours.output_tokens_per_s / hf.output_tokens_per_s
        agreement = _agreement(ours_ids, hf_ids)

    report = dict(
        benchmark="throughput", time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        model=str(model_path), num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        eos=args.eos, repeats=args.repeats, source_revision=source_revision(),
        prompt_tokens=dict(min=min(map(len, prompt_ids)), max=max(map(len, prompt_ids)),
                           mean=sum(map(len, prompt_ids)) / len(prompt_ids)),
        results=[r.to_json() for r in results], ours_over_hf=ratio, greedy_agreement=agreement,
        machine=machine_info(), load_avg_before=load_avg_before, load_avg_after=os.getloadavg())
    path = write_results(report, args.results_dir)
    print(format_table(results, ratio))
    print(f"load average before {load_avg_before[0]:.2f}, after {report['load_avg_after'][0]:.2f} "
          f"(1 min); written to {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
