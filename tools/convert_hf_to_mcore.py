"""Convert a Hugging Face model (Qwen2/2.5, Qwen3, Llama 2/3) into a megatron-core checkpoint.

    python tools/convert_hf_to_mcore.py --hf-dir Qwen2.5-1.5B-Instruct --out runs/qwen
    torchrun --nproc-per-node 4 tools/convert_hf_to_mcore.py --hf-dir BIG --out runs/big --tp 2 --pp 2

Writes RUN_DIR/checkpoints/iter_0000000/ (the actor only, plus hf/ with config.json and the tokenizer
files) and RUN_DIR/checkpoints/latest. The result loads at any TP/PP layout; --tp/--pp only choose the
layout the conversion itself runs at (one process holds the whole model at tp=pp=1).
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
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="run directory to write checkpoints/ into")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to convert at (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to convert at (default 1)")
    p.add_argument("--dtype", default=choices.AUTO, choices=list(choices.DTYPES),
                   help="dtype of the stored weights; auto: the one config.json names (default)")
    p.add_argument("--overwrite", action="store_true", help="replace iter_0000000 of --out (latest then names it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from liteppo_mcore.checkpoint.conversion import convert_hf_to_mcore
    from liteppo_mcore.checkpoint.paths import CheckpointError
    from liteppo_mcore.convert.layout import ConversionError
    from liteppo_mcore.models.shapes import ModelShapeError

    start = time.time()
    try:
        iter_dir = convert_hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                       overwrite=args.overwrite)
    except (ConversionError, CheckpointError, ModelShapeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {iter_dir} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
