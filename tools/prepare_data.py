"""Turn math datasets you already have on disk into the trainer's prompt files (JSONL).

Each output line is one object ``{"prompt": ..., "answer": ...}``: the fields the default data
section reads (``data.prompt_key: prompt``, ``data.answer_key: answer``), so a recipe needs no key
overrides. ``prompt`` is a string, or a list of ``{"role", "content"}`` messages kept as they were
(those need a tokenizer with a chat template); ``answer`` is the reference answer as text.

    python tools/prepare_data.py gsm8k/train.parquet --out data/gsm8k_train.jsonl
    python tools/prepare_data.py MATH/train.jsonl --out data/math_train.jsonl --split-eval 500
    python tools/prepare_data.py dapo-math-17k.parquet --dedup --out data/dapo_train.jsonl

Input shapes (``--format``, detected per file from its first record when ``auto``):

    gsm8k   question, answer ending in "#### N"     -> prompt = question, answer = N (commas, spaces dropped)
    math    problem, answer (MATH-500) or solution  -> prompt = problem, answer = the answer field, else
                                                       the last \\boxed{...} / \\fbox{...} of the solution
    dapo    prompt (messages), reward_model.ground_truth, data_source "math_dapo" (DAPO-Math-17k)
                                                    -> prompt kept, answer = ground_truth
    verl    prompt (messages), reward_model.ground_truth -> prompt kept, answer = ground_truth
    plain   prompt, answer (or --prompt-field / --answer-field) -> copied, checked

Input files: .jsonl / .ndjson (one object per line), .json (a list of objects, or JSON lines),
either optionally .gz; .parquet / .pq; a folder written by ``datasets``' ``save_to_disk`` (read
with ``datasets.load_from_disk``, so the ``datasets`` package must be installed). Nothing is ever
downloaded.

Rows that cannot be used (missing fields, no extractable answer, malformed JSON, ...) are skipped
and counted by reason, with the first few shown; if more than ``--max-skip-share`` (5%) of the rows
are unusable nothing is written and the exit status is 2, unless ``--allow-skips``. Every other
problem (a missing file, an unknown shape, an existing output without ``--force``) also exits 2
with a message naming the file and the fix.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("gsm8k", "math", "dapo", "verl", "plain")
JSON_EXTENSIONS = (".jsonl", ".ndjson", ".json")
PARQUET_EXTENSIONS = (".parquet", ".pq")
DEFAULT_MAX_SKIP_SHARE = 0.05
SHOWN_EXAMPLES = 5
INSTRUCTION_SEPARATOR = " "

# DAPO-Math-17k wraps every problem in its own instructions (an "Answer: ..." last line).
DAPO_HEAD = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_TAIL = 'Remember to put your answer on its own line after "Answer:".'

Prompt = str | list[dict[str, str]]


class PrepareError(Exception):
    """A problem that stops the run: printed as one message, exit status 2."""


class Skip(Exception):
    """A row that cannot be used: ``reason`` is the counted category, ``detail`` says what and how to fix."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Options:
    instruction: str | None = None
    strip_template: bool = False
    prompt_field: str = "prompt"
    answer_field: str = "answer"


# ---------------------------------------------------------------------------------------------------
# Answer extraction


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_BOX = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")


def gsm8k_answer(text: str) -> str:
    """The number after the last ``####`` of a GSM8K answer, commas and spaces dropped (``1,234`` -> ``1234``)."""
    if "####" not in text:
        raise Skip("no '#### N' answer", "the answer has no '#### N' final line; is this GSM8K? Pick --format")
    tail = text.rsplit("####", 1)[1].strip()
    number = re.sub(r"[,\s]", "", tail).lstrip("$").rstrip(".")
    if not _NUMBER.fullmatch(number):
        raise Skip("answer after '####' is not a number",
                   f"the text after '####' is {tail[:40]!r}, not a number; fix the row or drop it")
    return number


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, with nested braces.

    ``None`` when there is none. ``\\boxed 5`` (no braces) gives ``5``. Escaped braces ``\\{`` ``\\}``
    are content, not grouping. A last box whose braces never close raises ``Skip``.
    """
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    i = m.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        raise Skip("unbalanced \\boxed{", f"\\{m.group(1)} ends the text with nothing after it; fix the solution")
    if text[i] != "{":
        # \boxed 5 or \boxed 5$: one bare token.
        bare = re.match(r"[^\s$]+", text[i:])
        if i == m.end() or not bare:  # \boxedx is another command; '\boxed $' holds nothing
            raise Skip("no \\boxed{} answer", "the solution's last \\boxed holds no answer; fix the solution")
        return bare.group(0)
    depth = 0
    start = i + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    raise Skip("unbalanced \\boxed{",
               f"the last \\{m.group(1)}{{ of the solution never closes (its braces do not balance); fix the solution")


# ---------------------------------------------------------------------------------------------------
# Row conversion: record -> (prompt, answer), raising Skip


def _missing(record: dict[str, Any], needed: Sequence[str], fmt: str) -> Skip:
    present = ", ".join(sorted(map(str, record))) or "none"
    return Skip("missing fields",
                f"missing field(s) {', '.join(repr(k) for k in needed)} for --format {fmt} "
                f"(fields present: {present}); "
                "pick the right --format, or name the fields with --format plain --prompt-field/--answer-field")


def _text(value: Any, name: str, *, number_ok: bool = False) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("not text", f"field {name!r} holds bytes that are not UTF-8; store it as UTF-8 text") from None
    if number_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise Skip("not text", f"field {name!r} is a {type(value).__name__}, not a string; fix the row")
    return value


def _nonempty(value: str, what: str) -> str:
    if not value.strip():
        raise Skip(f"empty {what}", f"the {what} is empty; fix the row or drop it")
    return value.strip() if what == "answer" else value


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not value:
        raise Skip("bad messages", f"field {name!r} is an empty list of messages; give the prompt")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise Skip("bad messages",
                       f"field {name!r} item {i} is not a {{\"role\": str, \"content\": str}} message; fix the row")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise Skip("empty prompt", f"every message of field {name!r} is empty; fix the row or drop it")
    return out


def _prompt(value: Any, name: str) -> Prompt:
    if isinstance(value, (list, tuple)):
        return _messages(value, name)
    return _nonempty(_text(value, name), "prompt")


def _require(record: dict[str, Any], keys: Sequence[str], fmt: str) -> None:
    absent = [k for k in keys if record.get(k) is None]
    if absent:
        raise _missing(record, absent, fmt)


def convert_gsm8k(record: dict[str, Any], opts: Options) -> tuple[Prompt, str]:
    _require(record, ("question", "answer"), "gsm8k")
    prompt = _nonempty(_text(record["question"], "question"), "prompt")
    return prompt, gsm8k_answer(_text(record["answer"], "answer", number_ok=True))


def convert_math(record: dict[str, Any], opts: Options) -> tuple[Prompt, str]:
    _require(record, ("problem",), "math")
    prompt = _nonempty(_text(record["problem"], "problem"), "prompt")
    answer = record.get("answer")
    if answer is not None and _text(answer, "answer", number_ok=True).strip():
        return prompt, _text(answer, "answer", number_ok=True).strip()
    if record.get("solution") is None:
        raise _missing(record, ("answer", "solution"), "math")
    boxed = last_boxed(_text(record["solution"], "solution"))
    if boxed is None:
        raise Skip("no \\boxed{} answer",
                   "the solution has no \\boxed{...} or \\fbox{...} and the row no 'answer' field; "
                   "fix the row or drop it")
    return prompt, _nonempty(boxed, "answer")


def _ground_truth(record: dict[str, Any], fmt: str) -> str:
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise _missing(record, ("reward_model.ground_truth",), fmt)
    truth = reward_model["ground_truth"]
    if isinstance(truth, (list, tuple)):
        if len(truth) != 1:
            raise Skip("ground_truth is a list",
                       f"reward_model.ground_truth lists {len(truth)} answers; the reward takes one, so fix the row")
        truth = truth[0]
    return _nonempty(_text(truth, "reward_model.ground_truth", number_ok=True), "answer")


def strip_dapo_template(prompt: Prompt) -> str:
    """The bare problem inside DAPO-Math-17k's own instructions (head, blank line, problem, blank line, tail)."""
    text = prompt
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if len(users) != 1:
            raise Skip("no DAPO template",
                       f"--strip-template needs one user message, the row has {len(users)}; drop --strip-template")
        text = users[0]
    stripped = text.strip()
    if not (stripped.startswith(DAPO_HEAD) and stripped.endswith(DAPO_TAIL)):
        raise Skip("no DAPO template",
                   "the prompt is not wrapped in DAPO's 'Answer:' instructions; drop --strip-template for this file")
    return _nonempty(stripped[len(DAPO_HEAD):-len(DAPO_TAIL)].strip(), "prompt")


def convert_dapo(record: dict[str, Any], opts: Options) -> tuple[Prompt, str]:
    _require(record, ("prompt",), "dapo")
    prompt = _prompt(record["prompt"], "prompt")
    answer = _ground_truth(record, "dapo")
    if opts.strip_template:
        prompt = strip_dapo_template(prompt)
    return prompt, answer


def convert_verl(record: dict[str, Any], opts: Options) -> tuple[Prompt, str]:
    _require(record, ("prompt",), "verl")
    return _prompt(record["prompt"], "prompt"), _ground_truth(record, "verl")


def convert_plain(record: dict[str, Any], opts: Options) -> tuple[Prompt, str]:
    _require(record, (opts.prompt_field, opts.answer_field), "plain")
    prompt = _prompt(record[opts.prompt_field], opts.prompt_field)
    return prompt, _nonempty(_text(record[opts.answer_field], opts.answer_field, number_ok=True), "answer")


CONVERTERS: dict[str, Callable[[dict[str, Any], Options], tuple[Prompt, str]]] = {
    "gsm8k": convert_gsm8k, "math": convert_math, "dapo": convert_dapo, "verl": convert_verl, "plain": convert_plain,
}


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, (list, tuple)):
        return " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
    return str(prompt)


def detect_shape(record: dict[str, Any]) -> str | None:
    """The input shape a record has, or None."""
    reward_model = record.get("reward_model")
    if "prompt" in record and isinstance(reward_model, dict) and "ground_truth" in reward_model:
        dapo = "dapo" in str(record.get("data_source", "")).lower() or DAPO_HEAD in _prompt_text(record["prompt"])
        return "dapo" if dapo else "verl"
    if "question" in record and "answer" in record and "####" in str(record["answer"]):
        return "gsm8k"
    if "problem" in record and ("answer" in record or "solution" in record):
        return "math"
    if "prompt" in record and "answer" in record:
        return "plain"
    return None


SHAPES_HELP = (
    "gsm8k (question, answer with '#### N'), math (problem + answer or solution with \\boxed{}), "
    "dapo / verl (prompt, reward_model.ground_truth), plain (prompt, answer)"
)


# ---------------------------------------------------------------------------------------------------
# Readers: (location, record or Skip)

Row = tuple[str, dict[str, Any] | Skip]


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def iter_input(path: str, split: str) -> Iterator[Row]:
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _iter_saved(path, split)
        parquet = sorted(n for n in os.listdir(path) if n.endswith(PARQUET_EXTENSIONS))
        hint = f" It holds Parquet files ({', '.join(parquet[:3])}...): pass them as inputs." if parquet else ""
        raise PrepareError(
            f"{path}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json and state.json, "
            f"no dataset_dict.json).{hint} Give .jsonl, .json or .parquet files, or a save_to_disk folder."
        )
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: no such file (relative paths are read from {os.getcwd()!r}). Fix the path.")
    name = path.lower()[:-3] if path.lower().endswith(".gz") else path.lower()
    if name.endswith(PARQUET_EXTENSIONS):
        return _iter_parquet(path)
    if name.endswith(".json"):
        return _iter_json(path)
    if name.endswith(JSON_EXTENSIONS):
        return _iter_jsonl(path)
    raise PrepareError(
        f"{path}: unknown file type {os.path.splitext(path)[1] or '(no extension)'!r}. Give .jsonl, .ndjson, .json "
        "(optionally .gz), .parquet or .pq files, or a folder written by datasets' save_to_disk."
    )


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _iter_jsonl(path: str) -> Iterator[Row]:
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, Skip("malformed JSON",
                                      f"malformed JSON ({e.msg} at column {e.colno}); "
                                      "each line must hold one JSON object")
                    continue
                if not isinstance(record, dict):
                    yield where, Skip("not an object",
                                      f"the line holds a JSON {type(record).__name__}, not an object; fix the line")
                    continue
                yield where, record
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason}). Convert it, e.g. iconv -f latin1 -t utf-8.") from None
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path}: cannot read it ({e}). Check the file.") from None


def _iter_json(path: str) -> Iterator[Row]:
    """A .json file: one list of objects; a file of JSON lines with a .json name is read as JSONL."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason}). Convert it, e.g. iconv -f latin1 -t utf-8.") from None
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path}: cannot read it ({e}). Check the file.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines
            return _iter_jsonl(path)
        raise PrepareError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
            "A .json input must be one list of objects, or one object per line."
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise PrepareError(f"{path}: holds a JSON {type(data).__name__}; a .json input must be a list of objects.")

    def rows() -> Iterator[Row]:
        for i, record in enumerate(data):
            where = f"{path} item {i} (0-based)"
            if isinstance(record, dict):
                yield where, record
            else:
                yield where, Skip("not an object", f"the item is a JSON {type(record).__name__}, not an object")

    return rows()


def _iter_parquet(path: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a readable Parquet file ({e}). Check the file or its extension.") from None

    def rows() -> Iterator[Row]:
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            try:
                records = batch.to_pylist()
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"{path} rows {row}-{row + batch.num_rows - 1} (0-based): a string column holds bytes that are "
                    f"not UTF-8 ({e.reason}). Rewrite the column as UTF-8 text."
                ) from None
            for record in records:
                yield f"{path} row {row} (0-based)", record
                row += 1

    return rows()


def _iter_saved(path: str, split: str) -> Iterator[Row]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise PrepareError(
            f"{path}: a folder written by datasets' save_to_disk; reading it needs the 'datasets' package, which is "
            "not installed. Install it (pip install datasets), or, where it is installed, export the data to "
            "Parquet and pass that file: python -c \"import datasets; "
            f"datasets.load_from_disk('{path}')['{split}'].to_parquet('{split}.parquet')\" "
            "(leave out ['...'] for a single split)."
        ) from None
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(path)
    except Exception as e:  # datasets raises many types for a damaged folder
        raise PrepareError(
            f"{path}: datasets.load_from_disk failed ({type(e).__name__}: {e}). Check the folder."
        ) from e
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise PrepareError(
                f"{path}: a DatasetDict without the split {split!r} (it has: {', '.join(loaded)}). "
                "Pick one with --split NAME."
            )
        loaded = loaded[split]
        path = f"{path}[{split}]"

    def rows() -> Iterator[Row]:
        for i, record in enumerate(loaded):
            yield f"{path} row {i} (0-based)", record

    return rows()


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class Stats:
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    formats: list[tuple[str, str, str]] = field(default_factory=list)  # (file, format, how)
    messages: int = 0
    instruction_not_applied: int = 0

    def skip(self, where: str, err: Skip) -> None:
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        if len(self.examples) < SHOWN_EXAMPLES:
            self.examples.append(f"{where}: {err.detail}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def parse_eval_size(text: str) -> int | float:
    """``--split-eval``: a count (``500``) or a share of the distinct prompts (``0.05``)."""
    try:
        if re.fullmatch(r"\d+", text.strip()):
            value: int | float = int(text)
            if value >= 1:
                return value
        else:
            value = float(text)
            if 0.0 < value < 1.0:
                return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: give a count of prompts (e.g. 500) or a share in (0, 1) (e.g. 0.05)")


def default_eval_out(out: str) -> str:
    """``data/math_train.jsonl`` -> ``data/math_test.jsonl`` (the recipes' pair), else ``x.jsonl`` ->
    ``x_eval.jsonl``."""
    stem, ext = os.path.splitext(out)
    if stem.endswith("_train"):
        return stem[: -len("_train")] + "_test" + (ext or ".jsonl")
    return stem + "_eval" + (ext or ".jsonl")


def collect(inputs: Sequence[str], fmt: str, opts: Options, *, split: str, limit: int | None, dedup: bool,
            stats: Stats) -> list[tuple[str, str]]:
    """Every usable record as (prompt key, JSON line), in input order."""
    rows: list[tuple[str, str]] = []
    # line -> the same line, prompt -> the same prompt: repeated records share their strings (the original
    # DAPO-Math-17k file holds about 1.79M rows for about 17.4k distinct problems).
    seen: dict[str, str] = {}
    prompt_keys: dict[str, str] = {}
    for path in inputs:
        if limit is not None and len(rows) >= limit:
            break
        file_fmt = None if fmt == "auto" else fmt
        for where, record in iter_input(path, split):
            if limit is not None and len(rows) >= limit:
                break
            stats.read += 1
            if isinstance(record, Skip):
                stats.skip(where, record)
                continue
            if file_fmt is None:
                file_fmt = detect_shape(record)
                if file_fmt is None:
                    fields = ", ".join(sorted(map(str, record))) or "none"
                    raise PrepareError(
                        f"{where}: cannot tell the dataset's shape from its first record (fields: {fields}). "
                        f"Known shapes: {SHAPES_HELP}. Pass --format, or name the fields: "
                        "--format plain --prompt-field FIELD --answer-field FIELD."
                    )
                stats.formats.append((path, file_fmt, f"detected from {where}"))
            try:
                prompt, answer = CONVERTERS[file_fmt](record, opts)
            except Skip as err:
                stats.skip(where, err)
                continue
            if isinstance(prompt, str):
                if opts.instruction:
                    prompt = prompt.rstrip() + INSTRUCTION_SEPARATOR + opts.instruction
            else:
                stats.messages += 1
                if opts.instruction:
                    stats.instruction_not_applied += 1
            line = json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False)
            if line in seen:
                stats.duplicates += 1
                if dedup:
                    continue
                line = seen[line]
            else:
                seen[line] = line
            key = json.dumps(prompt, ensure_ascii=False)
            rows.append((prompt_keys.setdefault(key, key), line))
        if fmt != "auto":
            stats.formats.append((path, fmt, "--format"))
        elif file_fmt is None:
            stats.formats.append((path, "-", "no records"))
    return rows


def split_rows(rows: list[tuple[str, str]], size: int | float, seed: int) -> tuple[list[str], list[str]]:
    """(train lines, eval lines): ``size`` distinct prompts drawn with ``seed`` are held out, each once, and
    every copy of them leaves the training lines, so no held-out prompt is trained on."""
    order: dict[str, str] = {}
    for key, line in rows:
        order.setdefault(key, line)
    keys = list(order)
    n = size if isinstance(size, int) else max(1, round(size * len(keys)))
    if n >= len(keys):
        raise PrepareError(
            f"--split-eval {size} holds out {n} prompts, but there are only {len(keys)} distinct ones: "
            "none would be left to train on. Give a smaller --split-eval."
        )
    held = set(random.Random(seed).sample(range(len(keys)), n))
    held_keys = {keys[i] for i in held}
    eval_lines = [order[keys[i]] for i in sorted(held)]
    train_lines = [line for key, line in rows if key not in held_keys]
    return train_lines, eval_lines


def write_lines(path: str, lines: Sequence[str]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Convert local GSM8K / MATH / MATH-500 / DAPO-Math-17k / verl-style files into the trainer's "
                    "prompt JSONL ({\"prompt\": ..., \"answer\": ...} per line). Never downloads anything.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".jsonl/.ndjson/.json(.gz), .parquet/.pq files, or datasets save_to_disk folders "
                        "(read in order)")
    p.add_argument("--out", required=True, help="the training file to write, e.g. data/math_train.jsonl")
    p.add_argument("--format", default="auto", metavar="FORMAT",
                   help=f"input shape: auto (default: from each file's first record) or one of {', '.join(FORMATS)}")
    p.add_argument("--split-eval", type=parse_eval_size, default=None, metavar="N",
                   help="also write a held-out file of N distinct prompts (or a share, e.g. 0.05), drawn with --seed")
    p.add_argument("--eval-out", default=None,
                   help="the held-out file (default: --out with _train -> _test, else with _eval added)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use only the first N usable records (before the held-out split)")
    p.add_argument("--instruction", default=None,
                   help="text appended (after a space) to every string prompt, e.g. \"Let's think step by step and "
                        "output the final answer within \\boxed{}.\"; default: none. Message-list prompts are "
                        "kept as is")
    p.add_argument("--strip-template", action="store_true",
                   help="dapo: replace DAPO's own 'Answer:' instructions by the bare problem (a string prompt)")
    p.add_argument("--dedup", action="store_true",
                   help="drop records whose prompt and answer repeat an earlier one (the original DAPO-Math-17k "
                        "file repeats each problem many times)")
    p.add_argument("--prompt-field", default=None, help="plain: the field holding the prompt (default prompt)")
    p.add_argument("--answer-field", default=None, help="plain: the field holding the answer (default answer)")
    p.add_argument("--split", default="train", help="the split of a save_to_disk DatasetDict folder (default train)")
    p.add_argument("--max-skip-share", type=float, default=DEFAULT_MAX_SKIP_SHARE, metavar="SHARE",
                   help=f"fail (exit 2, nothing written) when more than this share of rows is unusable "
                        f"(default {DEFAULT_MAX_SKIP_SHARE})")
    p.add_argument("--allow-skips", action="store_true", help="write the usable rows however many are skipped")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def _check_args(args: argparse.Namespace) -> Options:
    if args.format != "auto" and args.format not in FORMATS:
        raise PrepareError(f"--format {args.format!r} is not a known format. Known: auto, {', '.join(FORMATS)}.")
    if args.prompt_field or args.answer_field:
        if args.format == "auto":
            args.format = "plain"
        elif args.format != "plain":
            raise PrepareError("--prompt-field / --answer-field name the fields of --format plain only.")
    if args.strip_template and args.format not in ("auto", "dapo"):
        raise PrepareError("--strip-template applies to --format dapo (or auto) only.")
    if args.limit is not None and args.limit < 1:
        raise PrepareError(f"--limit {args.limit}: give a positive number of records.")
    if not 0.0 <= args.max_skip_share <= 1.0:
        raise PrepareError(f"--max-skip-share {args.max_skip_share}: give a share between 0 and 1.")
    if args.eval_out and args.split_eval is None:
        raise PrepareError("--eval-out needs --split-eval N (how many prompts to hold out).")
    if args.split_eval is not None and not args.eval_out:
        args.eval_out = default_eval_out(args.out)
    outs = [args.out] + ([args.eval_out] if args.eval_out else [])
    if args.eval_out and os.path.abspath(args.eval_out) == os.path.abspath(args.out):
        raise PrepareError(f"--eval-out is the same file as --out ({args.out}). Give another path.")
    inputs = {os.path.abspath(p) for p in args.inputs}
    for out in outs:
        if os.path.abspath(out) in inputs:
            raise PrepareError(f"{out} is both an input and an output. Write to another path.")
        if os.path.isdir(out):
            raise PrepareError(f"{out} is a directory. Give a file path, e.g. {os.path.join(out, 'train.jsonl')}.")
        if os.path.exists(out) and not args.force:
            raise PrepareError(f"{out} exists already. Pass --force to overwrite it, or write to another path.")
    return Options(instruction=args.instruction or None, strip_template=args.strip_template,
                   prompt_field=args.prompt_field or "prompt", answer_field=args.answer_field or "answer")


def run(args: argparse.Namespace) -> int:
    opts = _check_args(args)
    stats = Stats()
    rows = collect(args.inputs, args.format, opts, split=args.split, limit=args.limit, dedup=args.dedup, stats=stats)

    for path, fmt, how in stats.formats:
        print(f"{path}: format {fmt} ({how})")
    print(f"rows read: {stats.read}, usable: {len(rows)}, skipped: {stats.num_skipped}"
          + (f", duplicates {'dropped' if args.dedup else 'kept'}: {stats.duplicates}" if stats.duplicates else ""))
    for reason, count in sorted(stats.skipped.items(), key=lambda kv: -kv[1]):
        print(f"  skipped, {reason}: {count}")
    if stats.examples:
        print("  first skipped rows:")
        for example in stats.examples:
            print(f"    {example}")

    if stats.read and stats.num_skipped > args.max_skip_share * stats.read and not args.allow_skips:
        share = 100.0 * stats.num_skipped / stats.read
        raise PrepareError(
            f"{stats.num_skipped} of {stats.read} rows ({share:.1f}%) are unusable, more than the "
            f"{100 * args.max_skip_share:g}% allowed (--max-skip-share); nothing written. Fix the input or pick the "
            "right --format (see the first skipped rows above), or pass --allow-skips to write the usable rows."
        )
    if not rows:
        raise PrepareError(f"no usable records in {', '.join(args.inputs)}: nothing written. "
                           "Check the input files and --format.")

    eval_lines: list[str] = []
    if args.split_eval is not None:
        train_lines, eval_lines = split_rows(rows, args.split_eval, args.seed)
    else:
        train_lines = [line for _, line in rows]
    write_lines(args.out, train_lines)
    print(f"wrote {args.out}: {len(train_lines)} records")
    if args.eval_out:
        write_lines(args.eval_out, eval_lines)
        print(f"wrote {args.eval_out}: {len(eval_lines)} records (held out with --seed {args.seed}; "
              "no training record has their prompts)")
    if stats.duplicates and not args.dedup:
        print(f"note: {stats.duplicates} records repeat an earlier prompt and answer; --dedup drops them")
    if stats.instruction_not_applied:
        print(f"note: --instruction was not added to {stats.instruction_not_applied} prompts given as message lists "
              "(for DAPO, --strip-template turns them into strings first)")
    if stats.messages:
        print(f"note: {stats.messages} prompts are message lists: train with a tokenizer that has a chat template")
    overrides = f"data.train_path={args.out}"
    overrides += f" data.eval_path={args.eval_out}" if args.eval_out else " data.eval_path=null"
    print("train on it with the overrides:")
    print(f"  {overrides}")
    if not args.eval_out:
        print("  (or set data.eval_path to a held-out file prepared the same way, or use --split-eval)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
