"""Load time of the default model (SmolLM2-135M-Instruct) from each checkpoint format.

    python -m bench.load_time               # 3 fresh processes per format
    python -m bench.load_time --repeats 5

Formats: the GGUF file as shipped (Q4_1 blocks, dequantised at load); the
same weights as an HF safetensors folder (float32, written once by HF
transformers from the GGUF); and our Orbax checkpoint folder, converted
from the GGUF at float32 and at bfloat16 (`balansis convert`). Each load
runs in a fresh Python process (`load_model(path)` until every weight is on
the device), so no process reuses another's arrays; the files are read once
before timing, so every format is timed from the page cache. Results go to
`bench/results/load_time-<UTC timestamp>.json`; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results_file import RESULTS_DIR, write_report
from bench.throughput import machine_info, source_revision

REPO = Path(__file__).resolve().parents[1]
_TIMED_LOAD = """
import json, sys, time
started = time.perf_counter()
import jax
from checkpoints.loader import load_model
imported = time.perf_counter()
loaded = load_model(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(loaded.model)))
done = time.perf_counter()
print(json.dumps({"load_s": done - imported, "import_s": imported - started}))
"""


def timed_loads(path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _TIMED_LOAD, str(path)], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    loads = [r["load_s"] for r in runs]
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in files),
            "load_s_median": statistics.median(loads), "load_s_min": min(loads), "load_s": loads,
            "import_s_median": statistics.median(r["import_s"] for r in runs)}


def write_safetensors(gguf_path: Path, folder: Path) -> None:
    """The GGUF's weights as HF writes them (float32), with the tokenizer."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True,
        quantization_config=transformers.GgufConfig(dequantize=True))
    model.save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               local_files_only=True).save_pretrained(folder)


def table(formats: dict) -> str:
    lines = ["| format | on disk | load s (median) | min | runs |", "|---|---|---|---|---|"]
    for name, r in formats.items():
        lines.append(f"| {name} | {r['bytes'] / 2**20:.0f} MiB | {r['load_s_median']:.2f} | {r['load_s_min']:.2f} "
                     f"| {len(r['load_s'])} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from checkpoints import orbax_dir
    from checkpoints.default_model import default_model_path
    from checkpoints.loader import load_model

    gguf_path = Path(args.model) if args.model else default_model_path()
    load_average_before, started, source = os.getloadavg(), time.perf_counter(), source_revision()
    with tempfile.TemporaryDirectory() as tmp:
        safetensors = Path(tmp) / "safetensors"
        write_safetensors(gguf_path, safetensors)
        paths = {"GGUF (Q4_1, as shipped)": gguf_path, "HF safetensors (f32)": safetensors}
        for dtype in ("f32", "bf16"):
            loaded = load_model(gguf_path, dtype=orbax_dir.DTYPES[dtype])
            paths[f"Orbax ({dtype})"] = Path(tmp) / f"orbax-{dtype}"
            orbax_dir.save(loaded.model, loaded.tokenizer, paths[f"Orbax ({dtype})"], source=str(gguf_path))
            del loaded
        for path in paths.values():  # into the page cache, for every format alike
            for p in ([path] if path.is_file() else path.rglob("*")):
                if p.is_file():
                    p.read_bytes()
        formats = {name: timed_loads(path, args.repeats) for name, path in paths.items()}
    report = {"benchmark": "load_time", "model": str(gguf_path), "source": source, "machine": machine_info(),
              "load_average_before": load_average_before, "formats": formats,
              "load_average_after": os.getloadavg(), "total_s": time.perf_counter() - started}
    path = write_report("load_time", report, args.results_dir)
    print(table(formats))
    print(f"\n{path}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per format")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
