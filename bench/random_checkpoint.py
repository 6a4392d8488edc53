"""A random-weight HF safetensors checkpoint of one of bench.roofline's shapes, with a given
tokenizer folder's files: something to serve where the default model's package is not installed
(the GPU check's hosts carry no model).

    python -m bench.random_checkpoint --shape smollm2-135m --tokenizer .gpu/tokenizer --out /tmp/smollm2-random
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from bench.roofline import SHAPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.random_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json and tokenizer_config.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    import transformers

    dims = SHAPES[args.shape]
    config = transformers.LlamaConfig(
        hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"],
        intermediate_size=dims["intermediate_size"], vocab_size=dims["vocab_size"],
        tie_word_embeddings=dims["tie_word_embeddings"], max_position_embeddings=8192)
    tokenizer = Path(args.tokenizer)
    special = transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    config.bos_token_id, config.eos_token_id = special.bos_token_id, special.eos_token_id
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
