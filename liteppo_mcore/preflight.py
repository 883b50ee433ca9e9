"""What a launch would find wrong with its inputs, found without a GPU, weights or process groups.

`preflight_problems(cfg)` checks, each on its own so that every problem is reported at once:
- the model: `model.hf_path` exists, its config.json parses and names a supported family;
  `model.load` is a complete checkpoint;
- the tokenizer: it loads (from model.tokenizer_path / model.hf_path, or the built-in task's) and is
  not empty;
- the data: `data.builtin_task` and a prompt file are not both set; each prompt file exists and its
  first records have the configured keys (data.prompt_key, data.answer_key, data.system_key);
- checkpoints: `checkpoint.load` is a complete checkpoint; a run directory holding another run's
  checkpoint is refused (as the start would), and one held by a live run's lock is named;
- SGLang: importable when `rollout.engine: sglang` starts its own servers.

`launch/pretrain_liteppo.py --dry-run` runs it on rank 0 and exits 2 listing the problems.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable
from typing import Any

FIRST_RECORDS = 5


def _collect(problems: list[str], check: Callable[[], str | None]) -> None:
    try:
        problem = check()
    except Exception as e:  # every check reports its own failure, whatever its type
        problem = str(e) or type(e).__name__
    if problem:
        problems.append(problem)


def _model(cfg: Any) -> str | None:
    from liteppo_mcore.checkpoint.paths import resolve_iteration_dir
    from liteppo_mcore.checkpoint.pretrained import pretrained_shape

    m = cfg.model
    if m.hf_path and not os.path.isdir(m.hf_path):
        return f"model.hf_path={m.hf_path!r}: no such directory. Point it at a Hugging Face model folder."
    if m.load:
        resolve_iteration_dir(m.load)
    if m.hf_path or m.load:
        pretrained_shape(cfg)  # parses config.json and checks the family
    return None


def _tokenizer(cfg: Any) -> str | None:
    from liteppo_mcore.data import tokenizer_from_config

    tokenizer_from_config(cfg.model, cfg.data)
    return None


def _data(cfg: Any, split: str) -> str | None:
    from liteppo_mcore.data.dataset import _raw_from_records
    from liteppo_mcore.data.errors import DataError
    from liteppo_mcore.data.readers import check_file, iter_records

    d = cfg.data
    path, key = (d.train_path, "data.train_path") if split == "train" else (d.eval_path, "data.eval_path")
    if d.builtin_task and path:
        raise DataError(f"data.builtin_task={d.builtin_task!r} and {key} are both set. Set data.builtin_task: null "
                        f"to train on files, or {key}: null for the built-in task.")
    if not path:
        if split == "train" and not d.builtin_task:
            raise DataError("data.train_path is not set, so there are no training prompts. Set data.train_path to "
                            "a JSONL or Parquet file, or set data.builtin_task.")
        return None
    check_file(path, key)
    if not _raw_from_records(itertools.islice(iter_records(path, d.format), FIRST_RECORDS), d, path):
        raise DataError(f"{key}={path!r} holds no records. Add one JSON object per line (JSONL) or rows (Parquet).")
    return None


def _checkpoints(cfg: Any) -> str | None:
    from liteppo_mcore.checkpoint.checkpointer import compatibility_problem
    from liteppo_mcore.checkpoint.lock import RunDirLock
    from liteppo_mcore.checkpoint.paths import checkpoints_dir, read_latest, resolve_iteration_dir

    folder: str | None
    if cfg.checkpoint.load:
        folder = resolve_iteration_dir(cfg.checkpoint.load)
    else:
        folder = read_latest(checkpoints_dir(cfg.output_dir))
        if folder is None or not os.path.isdir(folder):
            folder = None
    problem = compatibility_problem(cfg, folder) if folder else None
    if cfg.critic.load:  # a folder that is not a complete checkpoint raises CheckpointError, listed by the caller
        resolve_iteration_dir(cfg.critic.load)
    lock = RunDirLock(cfg.output_dir)
    holder = lock.holder()
    if holder is not None and lock.stale_reason(holder) is None:
        busy = (f"output_dir={cfg.output_dir} is in use by another run (lock file {lock.path}: host "
                f"{holder.get('host')}, PID {holder.get('pid')}). Wait for it to end, or choose another output_dir.")
        problem = f"{problem}\n  - {busy}" if problem else busy
    return problem


def _sglang(cfg: Any) -> str | None:
    r = cfg.rollout
    if r.engine == "sglang" and not r.server_urls and importlib.util.find_spec("sglang") is None:
        return ("rollout.engine=sglang starts SGLang servers here, but sglang is not installed. Install it "
                "(pip install 'liteppo-mcore[sglang]' on a GPU machine), or give rollout.server_urls, or choose "
                "rollout.engine: hf.")
    return None


def preflight_problems(cfg: Any) -> list[str]:
    """Every problem the launch would hit with `cfg`'s inputs, each with its fix ([] when none)."""
    problems: list[str] = []
    for check in (lambda: _model(cfg), lambda: _tokenizer(cfg), lambda: _data(cfg, "train"),
                  lambda: _data(cfg, "eval"), lambda: _checkpoints(cfg), lambda: _sglang(cfg)):
        _collect(problems, check)
    return problems
