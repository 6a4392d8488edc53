"""Run a tiny model over several meshes in one process of 8 CPU devices and
print what each gave, as JSON (used by test_sharding.py, in a subprocess,
because the device count is fixed when JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m tests.engine.sharded_worker FOLDER RUNS [ORBAX_FOLDER]

RUNS: `tp x dp / level` items, e.g. `1x1/standard,2x1/standard,2x1/ultra`;
`2x1/high+int8` quantises the weights (`--quantization int8`); `2x1/standard@orbax` restores the weights from ORBAX_FOLDER (optional third
argument, the same weights converted) straight onto the mesh.
For each: the engine's greedy tokens with top-5 logprobs and prompt
logprobs for a few prompts run together, and the full logits of one prompt
from a plain jitted forward over the sharded weights. Also the error a
tensor-parallel size of 3 gets (the tiny model has 4 heads).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax

# Each prompt plus its 6 new tokens fits one 16-token page: one prefill and one decode
# program per mesh (the ULTRA ones compile slowly on CPU).
PROMPTS = ([5, 17, 99, 3, 42, 42, 7], [200, 1, 2, 3], list(range(10, 19)), [250] * 9)


def main(folder: str, runs: str, orbax_folder: str | None = None) -> dict:
    from checkpoints.default_model import default_model_path
    from checkpoints.loader import LoadedModel, load_model
    from checkpoints.safetensors_dir import load_decoder
    from checkpoints.tokenizer import Tokenizer
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams
    from model import sharding
    from model.numerics import Precision
    from tests.forward import logits_function

    tokenizer = Tokenizer.from_gguf(default_model_path())  # SmolLM2's, for the first 256 ids
    results = {"devices": len(jax.devices()), "runs": {}}
    for run in runs.split(","):
        started = time.perf_counter()
        mesh_text, level = run.split("/")
        level, _, source = level.partition("@")  # "@orbax": restored from the converted checkpoint
        level, _, quantization = level.partition("+")  # "+int8": quantised weights
        tp, dp = (int(n) for n in mesh_text.split("x"))
        config = EngineConfig(max_model_len=128, max_num_seqs=8, kv_cache_memory=4 * 2**20,
                              tensor_parallel_size=tp, data_parallel_size=dp, quantization=quantization or "none")
        if source == "orbax":
            model = load_model(orbax_folder, mesh=config.mesh()).model
        else:
            _, model = load_decoder(Path(folder), mesh=config.mesh())  # straight onto the mesh
        loaded = LoadedModel(path=Path(folder), config=model.config, model=model, tokenizer=tokenizer)
        engine = LLMEngine(loaded, config)
        params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, prompt_logprobs=5,
                                ignore_eos=True, precision=level)
        for i, ids in enumerate(PROMPTS):
            engine.add_request(str(i), ids, params)
        finals = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
        outputs = [finals[str(i)] for i in range(len(PROMPTS))]
        model = engine.loaded.model  # quantised, when asked
        q_proj = model.layers.q_proj[...]
        q_scale = getattr(model.layers, "q_proj_scale", None)
        results["runs"][run] = {
            "tokens": [o.outputs[0].token_ids for o in outputs],
            "logprobs": [[(lp.logprob, *(v for _, v in lp.top)) for lp in o.outputs[0].logprobs]
                         for o in outputs],
            "prompt_logprobs": [[(lp.logprob, *(v for _, v in lp.top)) for lp in o.prompt_logprobs]
                                for o in outputs],
            "logits": logits_function(model)([PROMPTS[2]], precision=Precision(level))[0].tolist(),
            "q_proj_shard_shape": list(q_proj.sharding.shard_shape(q_proj.shape)),
            "q_proj_scale_shard_shape": None if q_scale is None else list(
                q_scale[...].sharding.shard_shape(q_scale[...].shape)),
            "kv_heads_split": sharding.kv_heads_axis(model.config, engine.mesh) is not None,
            "kv_cache_shard_shape": list(engine.runner.kv.k.sharding.shard_shape(engine.runner.kv.k.shape)),
            "seconds": time.perf_counter() - started,
        }
    try:
        load_decoder(Path(folder), mesh=sharding.make_mesh(3, 1))
        results["unsplittable"] = None
    except ValueError as e:
        results["unsplittable"] = str(e)
    return results


if __name__ == "__main__":
    json.dump(main(*sys.argv[1:4]), sys.stdout)
