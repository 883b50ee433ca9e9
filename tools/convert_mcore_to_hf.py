"""Convert the actor of a megatron-core checkpoint back into a Hugging Face model directory.

    python tools/convert_mcore_to_hf.py --ckpt runs/qwen --out qwen-trained
    python tools/convert_mcore_to_hf.py --ckpt runs/qwen/checkpoints/iter_0000200 --out q200 --dtype bf16

--ckpt is a run directory, its checkpoints/ folder (both resolved through `latest`) or one iter_*
folder, saved at any TP/PP layout. Writes config.json, model-*.safetensors with
model.safetensors.index.json, and the tokenizer/generation files stored in the checkpoint. Runs in
one process, which holds the whole model once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from liteppo_mcore.config import choices  # noqa: E402  (torch-free: --help stays quick)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, checkpoints/ folder or iter_* folder")
    p.add_argument("--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--dtype", default=choices.AUTO, choices=list(choices.DTYPES),
                   help="dtype of the written weights; auto: the one the stored config.json names (default)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from liteppo_mcore.checkpoint.conversion import convert_mcore_to_hf
    from liteppo_mcore.checkpoint.paths import CheckpointError
    from liteppo_mcore.convert.layout import ConversionError
    from liteppo_mcore.models.shapes import ModelShapeError

    start = time.time()
    try:
        files = convert_mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    overwrite=args.overwrite)
    except (ConversionError, CheckpointError, ModelShapeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} safetensors file(s) and config.json to {args.out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
