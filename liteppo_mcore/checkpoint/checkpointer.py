"""The trainer's checkpoints: when to save, how a save becomes final, what is kept, what is loaded.

    RUN_DIR/run.lock                      one writer per run directory (lock.py)
    RUN_DIR/checkpoints/iter_NNNNNNN/     complete checkpoints (trainer_state.py, manifest.py)
    RUN_DIR/checkpoints/latest            the newest complete one, written last and atomically

A save writes `iter_N.partial/`, hashes every file into its `checksums.json`, calls `before_final`
(the trainer writes the step's metrics row there, so that a step whose checkpoint is final always
has its row), and only then renames it to `iter_N` and moves `latest`. Re-saving a step that exists
(a run resumed from an earlier checkpoint) moves the old folder to `iter_N.replaced` first and
removes it only after `latest` names the new one: a kill at any moment leaves a complete checkpoint
for `latest` (a start renames an orphaned `.replaced` folder back). Retention
(`checkpoint.num_to_keep`) runs after `latest` moves, keeps the most recently saved folders, and never
removes the one `latest` names nor one being loaded (a load, here or by a conversion, marks the folder
while it reads).

A load checks the checksums first. A damaged or incomplete `latest` falls back to the newest intact
older checkpoint with a warning naming what was wrong; with `checkpoint.load` given explicitly, a
damaged checkpoint is an error (exit 2) naming the bad file. A full disk during a save removes the
partial folder, keeps `latest` where it was, and stops with "no space left on device".
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from liteppo_mcore.checkpoint import manifest as M
from liteppo_mcore.checkpoint.lock import RunDirLock, RunDirLocked, being_read, reading
from liteppo_mcore.checkpoint.paths import (
    HF_SUBDIR,
    CheckpointError,
    checkpoints_dir,
    iteration_dir,
    iteration_of,
    read_latest,
    resolve_iteration_dir,
    write_latest,
)
from liteppo_mcore.checkpoint.store import write_hf_side
from liteppo_mcore.checkpoint.trainer_state import checkpoint_common, read_trainer_state, write_trainer_state
from liteppo_mcore.config.loader import to_yaml

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
_ITER_DIR = re.compile(r"^iter_\d{7}$")
# DCP's CheckpointException derives from BaseException: `except Exception` would miss it.
_NOT_INTERRUPTS = (Exception, CheckpointException)
_DISK_FULL = ("no space left", "unexpected pos", "file write failed", "enospc", "disk quota exceeded")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def warn(message: str) -> None:
    if _rank() == 0:
        print(f"liteppo: warning: {message}", file=sys.stderr, flush=True)


def _agree(ok: bool, detail: str | None) -> list[str]:
    """Every rank's failure detail (empty when all ranks are fine): a collective, so that a failure
    on one rank sends every rank down the same path instead of into a barrier that never returns."""
    parts = M._gather(None if ok else (detail or "failed"))
    return [f"rank {r}: {d}" for r, d in enumerate(parts) if d is not None]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or anything in its chain, or a DCP CheckpointException's per-rank failures)
    comes from a full disk or quota."""
    seen = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(e).lower() for word in _DISK_FULL):
            return True
        if isinstance(e, BaseException):
            todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return False


# ---------------------------------------------------------------------------------------------------
# Folders


def complete_checkpoints(ckpts: str) -> list[str]:
    """The `iter_*` folders of `ckpts` that megatron finished writing, by iteration."""
    if not os.path.isdir(ckpts):
        return []
    names = sorted(n for n in os.listdir(ckpts) if _ITER_DIR.match(n))
    return [os.path.join(ckpts, n) for n in names if os.path.isfile(os.path.join(ckpts, n, "metadata.json"))]


def saved_at(folder: str) -> float:
    """When `folder` was saved: its manifest's time, else the folder's modification time."""
    try:
        found = M.read_manifest(folder)
    except ValueError:
        found = None
    return float(found["saved_at"]) if found and "saved_at" in found else os.path.getmtime(folder)


def recover_interrupted_replacements(ckpts: str) -> list[str]:
    """Rename `iter_N.replaced` folders back when `iter_N` is missing (a kill between the two
    renames of a re-save); remove those whose replacement is complete. Returns what was restored."""
    restored: list[str] = []
    if not os.path.isdir(ckpts):
        return restored
    for name in sorted(os.listdir(ckpts)):
        if not name.endswith(REPLACED_SUFFIX):
            continue
        old = os.path.join(ckpts, name)
        final = old[: -len(REPLACED_SUFFIX)]
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            restored.append(final)
    return restored


class Checkpointer:
    """Saves and loads a trainer's checkpoints in `cfg.output_dir` (every method is collective).

    `train_state` is the trainer: it gives `groups` (its ParallelGroups: the data-parallel ranks share
    the writing and reading), `tokenizer` (saved in `hf/`), `checkpointed()` -> (models, optimizers) by name,
    `state_dict()` / `load_state_dict(state)` for its own plain state (identical on every rank), and
    `hf_config()` for the Hugging Face config stored with the weights.
    """

    def __init__(self, cfg: Any, train_state: Any) -> None:
        self.cfg = cfg
        self.c = cfg.checkpoint
        self.run_dir = cfg.output_dir
        self.ckpts = checkpoints_dir(self.run_dir)
        self.state = train_state
        self.lock = RunDirLock(self.run_dir)
        self.loaded_from: str | None = None
        self.last_saved_step: int | None = None
        """The step of the newest checkpoint this run saved or resumed from."""

    # ---------------------------------------------------------------- lock
    def acquire_lock(self) -> None:
        """Take the run directory's lock on rank 0; every rank raises RunDirLocked if it is held."""
        error = None
        if _rank() == 0:
            try:
                self.lock.acquire()
            except CheckpointError as e:
                error = str(e)
            if self.lock.took_over:
                warn(f"took over the lock of {self.run_dir} because {self.lock.took_over}")
        failed = M._broadcast(error)
        if failed:
            raise RunDirLocked(failed)
        if _rank() == 0:
            for folder in recover_interrupted_replacements(self.ckpts):
                warn(f"{folder}: restored the previous copy of this step (a re-save of it was interrupted)")
        _barrier()

    def close(self) -> None:
        if _rank() == 0:
            self.lock.release()

    # ---------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        interval = self.c.save_interval
        return step == self.cfg.max_steps or bool(interval and step % interval == 0)

    def save(self, step: int, *, before_final: Callable[[float], None] | None = None) -> str:
        """Save the trainer at `step`; returns the iteration folder once `latest` names it.
        `before_final(seconds)` runs on rank 0 once the checkpoint is complete on disk and before it
        becomes final, with the seconds the save took so far."""
        t0 = time.perf_counter()
        final = iteration_dir(self.run_dir, step)
        partial = final + PARTIAL_SUFFIX
        if _rank() == 0:
            os.makedirs(self.ckpts, exist_ok=True)
            if os.path.isdir(partial):  # leftovers of a killed save of this step
                shutil.rmtree(partial)
            self._warn_if_short_of_space()
            os.makedirs(partial)
        _barrier()
        models, optimizers = self.state.checkpointed()
        ok, detail, exc = True, None, None
        try:
            common = {**self.state.state_dict(), "config": to_yaml(self.cfg)}  # the config: for _check_compatible
            write_trainer_state(partial, models=models, optimizers=optimizers, common=common,
                                parallel_group=self.state.groups.dp_cp_group)
            if _rank() == 0:
                write_hf_side(partial, self.state.hf_config(), self.cfg.model.hf_path)
                self._write_tokenizer(partial)
        except _NOT_INTERRUPTS as e:  # every rank must learn of it, or the others wait forever below
            ok, detail, exc = False, f"{type(e).__name__}: {e}", e
        failures = _agree(ok, detail)
        if not failures:
            try:
                if self.c.verify:
                    M.write_manifest(partial, {"step": step})
            except OSError as e:
                ok, detail, exc = False, f"{type(e).__name__}: {e}", e
            failures = _agree(ok, detail)
        if failures:
            self._failed_save(partial, failures, exc)
        if before_final is not None and _rank() == 0:
            before_final(time.perf_counter() - t0)
        if _rank() == 0:
            self._finalize(partial, final, step)
        _barrier()
        self.last_saved_step = step
        return final

    def _write_tokenizer(self, folder: str) -> None:
        """The run's own tokenizer into `hf/` (the built-in one, or model.tokenizer_path's) unless
        model.hf_path's files, copied there already, are it: an exported checkpoint then tokenizes
        (AutoTokenizer, its chat template) with nothing else."""
        tokenizer = getattr(self.state, "tokenizer", None)
        m = self.cfg.model
        if tokenizer is not None and (m.tokenizer_path or not m.hf_path):
            tokenizer.save_pretrained(os.path.join(folder, HF_SUBDIR))

    def _finalize(self, partial: str, final: str, step: int) -> None:
        replaced = final + REPLACED_SUFFIX
        if os.path.isdir(final):
            if os.path.isdir(replaced):
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(partial, final)
        write_latest(self.ckpts, step)
        if os.path.isdir(replaced):
            shutil.rmtree(replaced)
        self._apply_retention(keep=final)

    def _failed_save(self, partial: str, failures: list[str], exc: BaseException | None) -> None:
        latest = M._broadcast(read_latest(self.ckpts) if _rank() == 0 else None)
        full = M._gather(exc is not None and is_disk_full(exc))
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier()
        kept = f"{latest} stays the latest checkpoint" if latest else "no earlier checkpoint exists"
        if any(full):
            free = shutil.disk_usage(self.ckpts).free if os.path.isdir(self.ckpts) else 0
            raise CheckpointError(
                f"no space left on device while writing {partial} ({free} bytes free); the partial folder was "
                f"removed and {kept}. Free space (or lower checkpoint.num_to_keep), or move output_dir to a larger "
                "disk, then run the same command to resume.")
        raise CheckpointError(f"saving {partial} failed ({'; '.join(failures)}); the partial folder was removed and "
                              f"{kept}.") from exc

    def _warn_if_short_of_space(self) -> None:
        latest = read_latest(self.ckpts)
        if latest is None or not os.path.isdir(latest):
            return
        need = M.folder_bytes(latest)
        free = shutil.disk_usage(self.ckpts).free
        if free < need * 1.1:
            warn(f"only {free} bytes free on the disk of {self.ckpts}, and the last checkpoint took {need}: this "
                 "save may fail. Free space or lower checkpoint.num_to_keep.")

    def _apply_retention(self, keep: str) -> None:
        """Keep the `num_to_keep` most recently saved checkpoints (and the protected ones)."""
        n = self.c.num_to_keep
        if not n:
            return
        protected = {os.path.normpath(keep)}
        folders = sorted(complete_checkpoints(self.ckpts), key=saved_at, reverse=True)
        for folder in folders[n:]:
            if os.path.normpath(folder) in protected or being_read(folder):
                continue
            shutil.rmtree(folder, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def _candidates(self) -> tuple[list[str], bool, list[str]]:
        """(folders to try in order, explicit, notes on what was skipped)."""
        if self.c.load:
            return [resolve_iteration_dir(self.c.load)], True, []
        notes: list[str] = []
        try:
            latest = read_latest(self.ckpts)
        except CheckpointError as e:
            latest, notes = None, [str(e)]
            found = complete_checkpoints(self.ckpts)
            return list(reversed(found)), False, notes
        if latest is None:
            return [], False, notes
        newest = iteration_of(latest)
        older = [f for f in complete_checkpoints(self.ckpts) if iteration_of(f) < newest]
        return [latest] + list(reversed(older)), False, notes

    def _problems(self, folder: str) -> list[str]:
        """What is wrong with `folder` as a checkpoint (collective); [] when it looks intact."""
        def missing() -> str | None:
            if not os.path.isdir(folder):
                return f"{folder} does not exist"
            if not os.path.isfile(os.path.join(folder, "metadata.json")):
                return f"{folder} is incomplete (no metadata.json)"
            return None

        absent = M._broadcast(missing() if _rank() == 0 else None)
        if absent:
            return [absent]
        if not self.c.verify:
            return []
        problems, found = M.verify(folder)
        if problems is None:
            warn(f"{folder} has no {M.MANIFEST} (saved by an older version): loading it unverified")
            return []
        return problems

    def load(self) -> str | None:
        """Resume from `checkpoint.load`, else from the run directory's latest intact checkpoint (none:
        a fresh start); a checkpoint of another model or algorithm is refused. Returns the folder loaded."""
        candidates, explicit, notes = M._broadcast(self._candidates() if _rank() == 0 else None)
        for note in notes:
            warn(f"{note} Looking for the newest intact checkpoint instead.")
        rejected: list[str] = []
        for folder in candidates:
            problems = self._problems(folder)
            if not problems:
                problems = self._read(folder)
                if not problems:
                    if rejected:
                        warn(f"resumed from {folder}, the newest intact checkpoint, instead of "
                             f"{candidates[0]}: {rejected[0]}")
                    self.loaded_from = folder
                    self.last_saved_step = iteration_of(folder) if not explicit else None
                    return folder
            detail = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
            if explicit:
                raise CheckpointError(f"checkpoint.load={self.c.load}: {detail}. Point checkpoint.load at an intact "
                                      "checkpoint, or copy this one again.")
            warn(f"skipping {folder}: {detail}")
            rejected.append(detail)
        if rejected or notes:
            raise CheckpointError(
                f"no intact checkpoint in {self.ckpts} ({'; '.join(rejected + notes)}). Move the damaged folders "
                "away to start this run over, or set checkpoint.load to a good checkpoint.")
        return None

    def _read(self, folder: str) -> list[str]:
        models, optimizers = self.state.checkpointed()
        ok, detail = True, None
        try:
            self._check_compatible(folder)
            with reading(folder):
                common = read_trainer_state(folder, models=models, optimizers=optimizers,
                                            parallel_group=self.state.groups.dp_cp_group,
                                            fully_parallel=not self.cfg.train.use_distributed_optimizer)
        except CheckpointError:
            raise
        except _NOT_INTERRUPTS as e:  # a damaged file the checksums could not see (or an unverified checkpoint)
            ok, detail = False, f"{folder} could not be read ({type(e).__name__}: {e})"
        failures = _agree(ok, detail)
        if failures:
            return failures
        if not common.pop("rng_restored", False):
            warn(f"{folder} was saved by {common.get('world_size')} processes, this run has "
                 f"{dist.get_world_size()}: RNG states start from seed={self.cfg.seed} instead of the saved ones "
                 "(sampling is seeded per step and rank, so rollouts do not depend on them).")
        self.state.load_state_dict(common)
        return []

    def _check_compatible(self, folder: str) -> None:
        """Refuse a checkpoint of a different model or algorithm before megatron fails on its tensors."""
        problem = compatibility_problem(self.cfg, folder)
        if problem:
            raise CheckpointError(problem)


def compatibility_problem(cfg: Any, folder: str) -> str | None:
    """Why `folder`'s checkpoint cannot continue `cfg`'s run (another model or algorithm), else None."""
    stored = checkpoint_common(folder).get("config")
    if not stored:
        return None
    old = OmegaConf.to_container(OmegaConf.create(stored))
    new = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    differ = [(k, _get(old, k), _get(new, k)) for k in _MUST_MATCH if _get(old, k) != _get(new, k)]
    if not differ:
        return None
    detail = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in differ)
    return (f"{folder} belongs to another run ({detail}). Choose a new output_dir, or set checkpoint.load to a "
            "checkpoint of this model (model.load to start a new run from its actor weights).")


_MUST_MATCH = [f"model.{k}" for k in ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                      "num_query_groups", "hf_path", "vocab_size")] + ["adv_estimator"]


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
