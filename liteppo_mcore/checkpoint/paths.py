"""Where checkpoints live: `RUN_DIR/checkpoints/iter_NNNNNNN/` folders and `RUN_DIR/checkpoints/latest`.

`latest` names the newest complete iteration folder; it is written last and atomically, so a folder
that `latest` does not name may be incomplete and is never picked up on its own.
"""

from __future__ import annotations

import os
import re

CHECKPOINTS = "checkpoints"
LATEST = "latest"
HF_SUBDIR = "hf"  # inside an iteration folder: config.json, tokenizer and generation files
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint path or content that cannot be used, with what to do about it."""


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def iteration_dir(run_dir: str, iteration: int) -> str:
    return os.path.join(checkpoints_dir(run_dir), iter_name(iteration))


def iteration_of(iter_dir: str) -> int:
    m = _ITER.match(os.path.basename(os.path.normpath(iter_dir)))
    if not m:
        raise CheckpointError(f"{iter_dir}: not an iteration folder (iter_NNNNNNN).")
    return int(m.group(1))


def write_latest(ckpts_dir: str, iteration: int) -> None:
    """Point `latest` at iteration `iteration` (temp file, then os.replace: never half-written)."""
    path = os.path.join(ckpts_dir, LATEST)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(iter_name(iteration) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpts_dir: str) -> str | None:
    """The iteration folder `latest` names (None when there is no `latest`)."""
    path = os.path.join(ckpts_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    name = iter_name(int(text)) if text.isdigit() else text
    if not _ITER.match(name):
        raise CheckpointError(f"{path}: expected an iteration folder name (iter_NNNNNNN), found {text!r}. "
                              "Rewrite it with the name of the newest complete iter_* folder.")
    return os.path.join(ckpts_dir, name)


def _is_iteration_dir(path: str) -> bool:
    return bool(_ITER.match(os.path.basename(os.path.normpath(path)))) or \
        os.path.isfile(os.path.join(path, "metadata.json"))


def resolve_iteration_dir(path: str) -> str:
    """The iteration folder meant by `path`: a run directory, its `checkpoints/` folder (both via
    `latest`), or an `iter_*` folder itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory. Give a run directory, its checkpoints/ folder "
                              "or an iter_NNNNNNN folder.")
    if _is_iteration_dir(path):
        found = path
    else:
        latest = read_latest(path) or read_latest(checkpoints_dir(path))
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint here (no {LATEST} file in it or in {CHECKPOINTS}/). "
                                  "Give a run directory, its checkpoints/ folder or an iter_NNNNNNN folder.")
        found = latest
    if not os.path.isfile(os.path.join(found, "metadata.json")):
        raise CheckpointError(f"{found}: not a complete megatron distributed checkpoint (no metadata.json). "
                              "Point at a complete iter_* folder, or convert the model again.")
    return found
