"""Prompt data: file readers, tokenizers and chat templates, length filtering, deterministic batching,
and the built-in synthetic tasks with their tokenizer.

Typical use by the trainer::

    tokenizer = tokenizer_from_config(cfg.model, cfg.data)
    train, held_out = build_datasets(cfg.data, tokenizer, prompt_length=cfg.prompt_length)
    sampler = PromptSampler(len(train), cfg.rollout_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    prompts = shard_for_rank(train.select(sampler.next_batch()), dp_rank, dp_size)
"""

from .builtin_tasks import BuiltinTask, builtin_task_names, get_builtin_task, is_held_out, task_examples
from .builtin_tokenizer import build_builtin_tokenizer
from .dataset import PromptDataset, PromptSample, build_dataset, build_datasets
from .errors import DataError
from .readers import detect_format, iter_records
from .sampler import PromptSampler, epoch_permutation, shard_for_rank
from .tokenization import load_tokenizer, render_prompt, tokenizer_from_config

__all__ = [
    "BuiltinTask",
    "DataError",
    "PromptDataset",
    "PromptSample",
    "PromptSampler",
    "build_builtin_tokenizer",
    "build_dataset",
    "build_datasets",
    "builtin_task_names",
    "detect_format",
    "epoch_permutation",
    "get_builtin_task",
    "is_held_out",
    "iter_records",
    "load_tokenizer",
    "render_prompt",
    "shard_for_rank",
    "task_examples",
    "tokenizer_from_config",
]
