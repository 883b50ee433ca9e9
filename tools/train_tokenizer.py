"""Learn a small byte-level BPE tokenizer from prompt files, for a model trained from random weights.

    python tools/train_tokenizer.py data/gsm8k_train.jsonl --out my_tokenizer
    python tools/train_tokenizer.py data/math_train.jsonl data/math_test.jsonl --out tok --vocab-size 2048

The inputs are the trainer's prompt files (JSONL or Parquet, as tools/prepare_data.py writes them);
the tokenizer learns from every prompt (string, or the contents of its chat messages) and every
answer. It is byte level, so it can write any text, and it has the built-in tokenizer's special
tokens and chat format (<|bos|>, <|user|>, <|assistant|>, <|end|> as EOS, <|pad|>). The folder is
written with save_pretrained: give it to the trainer as model.tokenizer_path=DIR (and model.vocab_size
follows from it). A pretrained model brings its own tokenizer (model.hf_path); this tool is for
models that start from random weights. Exit status 2 with a message for a bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_VOCAB_SIZE = 512


class TokenizerToolError(Exception):
    """A problem with the tool's inputs or output (printed, exit status 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_tokenizer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE", help="prompt files (.jsonl / .parquet) to learn from")
    p.add_argument("--out", required=True, help="the tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help=f"tokens in all, the 256 bytes and the special tokens included (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--prompt-key", default="prompt", help="the prompt field (default prompt, as data.prompt_key)")
    p.add_argument("--answer-key", default="answer", help="the answer field (default answer, as data.answer_key)")
    p.add_argument("--force", action="store_true", help="write into an existing, non-empty folder")
    return p.parse_args(argv)


def record_texts(paths: list[str], prompt_key: str, answer_key: str) -> Iterator[str]:
    """Every prompt (a string, or each message's content) and answer of the files, in order."""
    from liteppo_mcore.data import iter_records

    for path in paths:
        if not os.path.isfile(path):
            raise TokenizerToolError(f"{path}: no such file. Give prompt files (e.g. from tools/prepare_data.py).")
        for where, record in iter_records(path):
            if prompt_key not in record:
                raise TokenizerToolError(f"{where}: no field {prompt_key!r} (fields: {', '.join(record)}); "
                                         "name the prompt field with --prompt-key.")
            prompt = record[prompt_key]
            if isinstance(prompt, list):
                yield from (str(m.get("content", "")) for m in prompt if isinstance(m, dict))
            else:
                yield str(prompt)
            if record.get(answer_key) is not None:
                yield str(record[answer_key])


def main(argv=None) -> int:
    args = parse_args(argv)
    from liteppo_mcore.data import DataError
    from liteppo_mcore.data.builtin_tokenizer import train_bpe_tokenizer

    try:
        if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
            raise TokenizerToolError(f"{args.out} exists and is not empty. Pass --force, or write to another folder.")
        texts = list(record_texts(args.inputs, args.prompt_key, args.answer_key))
        if not texts:
            raise TokenizerToolError(f"{', '.join(args.inputs)}: no records to learn from.")
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size)
    except (TokenizerToolError, DataError, ValueError) as e:
        print(f"train_tokenizer.py: {e}", file=sys.stderr)
        return 2
    tokenizer.save_pretrained(args.out)
    print(f"learned from {len(texts)} texts of {len(args.inputs)} file(s): byte-level BPE, {len(tokenizer)} tokens")
    print(f"wrote {args.out}; train with it: model.tokenizer_path={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
