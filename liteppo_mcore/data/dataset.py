"""Prompt datasets: records from a file or a built-in task -> rendered, tokenized, length-filtered prompts.

    build_dataset(cfg.data, tokenizer, prompt_length=cfg.prompt_length, split="train")

Prompts longer than ``prompt_length`` tokens are dropped here, once, and the count is logged and kept
on the dataset (``num_dropped``); a dataset left empty is an error naming the file and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.schema import DataConfig
from .builtin_tasks import get_builtin_task, task_examples
from .errors import DataError
from .readers import Record, check_file, iter_records
from .tokenization import PromptInput, encode_rendered, has_chat_template, render_prompts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSample:
    index: int
    """Position in the dataset (after filtering): what the sampler hands out."""
    prompt_ids: list[int]
    """Token ids the model is conditioned on (chat template applied when used)."""
    prompt_text: str
    """The rendered text behind ``prompt_ids``."""
    answer: str
    """Reference answer handed to the reward function."""
    source: str
    """Where the sample came from: ``file:line``, ``file row N (0-based)`` or ``builtin:task/split#i``."""


@dataclass(frozen=True)
class _RawSample:
    source: str
    prompt: PromptInput
    answer: str
    system: str | None


class PromptDataset(Sequence[PromptSample]):
    """The prompts of one split, in source order, every one at most ``prompt_length`` tokens."""

    def __init__(self, samples: list[PromptSample], *, name: str, num_read: int, prompt_length: int) -> None:
        self.samples = samples
        self.name = name
        self.num_read = num_read
        self.num_dropped = num_read - len(samples)
        self.prompt_length = prompt_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:  # type: ignore[override]
        return self.samples[i]

    def __iter__(self) -> Iterator[PromptSample]:
        return iter(self.samples)

    def select(self, indices: Iterable[int]) -> list[PromptSample]:
        """The samples at ``indices`` (e.g. one batch from the sampler), in that order."""
        return [self.samples[i] for i in indices]

    def __repr__(self) -> str:
        return (
            f"PromptDataset({self.name!r}, {len(self)} prompts, "
            f"{self.num_dropped} dropped > {self.prompt_length} tokens)"
        )


def build_dataset(data: DataConfig, tokenizer: Any, *, prompt_length: int, split: str = "train") -> PromptDataset:
    """The ``train`` or ``eval`` prompts named by the data section, tokenized and length-filtered."""
    name, raw = _load_raw(data, split)
    use_template = bool(data.apply_chat_template) and has_chat_template(tokenizer)
    texts = render_prompts(tokenizer, [s.prompt for s in raw], [s.system for s in raw], use_chat_template=use_template)
    ids = encode_rendered(tokenizer, texts, templated=use_template)
    _check_unknown_tokens(tokenizer, ids, name)
    samples: list[PromptSample] = []
    for sample, text, prompt_ids in zip(raw, texts, ids):
        if len(prompt_ids) <= prompt_length:
            samples.append(PromptSample(len(samples), list(prompt_ids), text, sample.answer, sample.source))
    dataset = PromptDataset(samples, name=name, num_read=len(raw), prompt_length=prompt_length)
    _report_filter(dataset, max((len(x) for x in ids), default=0))
    return dataset


MAX_UNKNOWN_SHARE = 0.01


def _check_unknown_tokens(tokenizer: Any, ids: Sequence[Sequence[int]], name: str) -> None:
    """Refuse prompts the tokenizer cannot write: more than MAX_UNKNOWN_SHARE of their tokens are its
    unknown token (the built-in character tokenizer maps every character it lacks to <|unk|>)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    total = sum(len(x) for x in ids)
    if unk is None or total == 0:
        return
    unknown = sum(1 for x in ids for t in x if t == unk)
    if unknown > MAX_UNKNOWN_SHARE * total:
        raise DataError(
            f"{name}: {unknown} of the prompts' {total} tokens ({100 * unknown / total:.1f}%) are the tokenizer's "
            f"unknown token {getattr(tokenizer, 'unk_token', None)!r}: it cannot write this text (the built-in "
            "tokenizer knows only the built-in tasks' characters). Give a tokenizer that covers the data: "
            "model.tokenizer_path=/path/to/tokenizer_dir (or model.hf_path=/path/to/model)."
        )


def build_datasets(
    data: DataConfig, tokenizer: Any, *, prompt_length: int
) -> tuple[PromptDataset, PromptDataset | None]:
    """The training prompts and the held-out prompts (None when the data section names none)."""
    train = build_dataset(data, tokenizer, prompt_length=prompt_length, split="train")
    if not (data.builtin_task or data.eval_path):
        return train, None
    return train, build_dataset(data, tokenizer, prompt_length=prompt_length, split="eval")


def _report_filter(dataset: PromptDataset, longest: int) -> None:
    if len(dataset) == 0:
        raise DataError(
            f"{dataset.name}: all {dataset.num_read} prompts are longer than prompt_length={dataset.prompt_length} "
            f"tokens (the longest has {longest}), so none is left. Raise prompt_length, or shorten the prompts."
        )
    if dataset.num_dropped:
        logger.warning(
            "%s: dropped %d of %d prompts longer than prompt_length=%d tokens (the longest has %d); %d left",
            dataset.name, dataset.num_dropped, dataset.num_read, dataset.prompt_length, longest, len(dataset),
        )
    else:
        logger.info(
            "%s: %d prompts, none longer than prompt_length=%d", dataset.name, len(dataset), dataset.prompt_length
        )


def _load_raw(data: DataConfig, split: str) -> tuple[str, list[_RawSample]]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    key = "data.train_path" if split == "train" else "data.eval_path"
    path = data.train_path if split == "train" else data.eval_path
    if data.builtin_task and (data.train_path or data.eval_path):
        raise DataError(
            f"data.builtin_task={data.builtin_task!r} and a prompt file are both set. "
            "Set data.builtin_task: null to train on files, or data.train_path/eval_path: null for the built-in task."
        )
    if data.builtin_task:
        get_builtin_task(data.builtin_task)
        name = f"builtin:{data.builtin_task}/{split}"
        examples = task_examples(data.builtin_task, split)
        return name, [_RawSample(f"{name}#{i}", p, a, data.system_prompt) for i, (p, a) in enumerate(examples)]
    if not path:
        raise DataError(
            f"{key} is not set, so there are no {split} prompts. "
            f"Set {key} to a JSONL or Parquet file, or set data.builtin_task."
        )
    check_file(path, key)
    raw = _raw_from_records(iter_records(path, data.format), data, path)
    if not raw:
        raise DataError(f"{key}={path!r} holds no records. Add one JSON object per line (JSONL) or rows (Parquet).")
    return path, raw


def _raw_from_records(records: Iterable[tuple[str, Record]], data: DataConfig, path: str) -> list[_RawSample]:
    raw: list[_RawSample] = []
    seen_system_key = False
    for where, record in records:
        system = data.system_prompt
        if data.system_key is not None and record.get(data.system_key) is not None:
            seen_system_key = True
            system = _text_field(record, data.system_key, where, "data.system_key")
        prompt = _prompt_field(record, data.prompt_key, where)
        raw.append(_RawSample(where, prompt, _answer_field(record, data.answer_key, where), system))
    if raw and data.system_key is not None and not seen_system_key:
        raise DataError(
            f"{path}: data.system_key={data.system_key!r} is set but no record has that field. "
            "Fix the field name, or set data.system_key: null."
        )
    return raw


def _missing(record: Record, key: str, where: str, setting: str) -> DataError:
    present = ", ".join(sorted(map(str, record))) or "none"
    return DataError(
        f"{where}: missing field {key!r} (fields present: {present}). "
        f"Set {setting} to the field that holds it, or add the field to every record."
    )


def _text_field(record: Record, key: str, where: str, setting: str) -> str:
    if key not in record or record[key] is None:
        raise _missing(record, key, where, setting)
    value = record[key]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}: field {key!r} holds bytes that are not valid UTF-8 ({e.reason}). "
                "Store the field as UTF-8 text."
            ) from None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {key!r} must be a string, got {type(value).__name__}. Fix the record or {setting}."
        )
    return value


def _prompt_field(record: Record, key: str, where: str) -> PromptInput:
    value = record.get(key)
    if isinstance(value, list):  # chat format: a list of {"role", "content"} messages
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(
                    f"{where}: field {key!r} is a list, so every item must be a message "
                    "{\"role\": ..., \"content\": ...} with string values. "
                    "Fix the record, or give the prompt as a string."
                )
        if not value:
            raise DataError(f"{where}: field {key!r} is an empty list of messages. Give the prompt text.")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    text = _text_field(record, key, where, "data.prompt_key")
    if not text.strip():
        raise DataError(f"{where}: field {key!r} is empty. Remove the record or give it a prompt.")
    return text


def _answer_field(record: Record, key: str, where: str) -> str:
    value = record.get(key)
    # Numbers are common reference answers (42, 0.5); bools are almost surely a wrong field.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text_field(record, key, where, "data.answer_key")
