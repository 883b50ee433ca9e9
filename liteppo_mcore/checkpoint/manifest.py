"""`checksums.json`: the size and SHA-256 of every file of an iteration folder.

Written at save, inside the temporary folder before it is renamed, so a folder under its final name
always has one; checked at load. Both directions share the files out over the ranks (file i goes to
rank i % world), so the cost per rank is its share of the checkpoint at about 1 GB/s.

A checkpoint without the file (saved by an older version, or converted by hand) loads unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import torch.distributed as dist

MANIFEST = "checksums.json"
_CHUNK = 8 << 20
# Files that may appear in a folder after it was saved: not part of the checkpoint.
_NOT_LISTED_PREFIXES = (MANIFEST, ".reading.")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def list_files(folder: str) -> list[str]:
    """Every file under `folder`, relative and sorted, the manifest and read markers excepted."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not rel.startswith(_NOT_LISTED_PREFIXES):
                out.append(rel)
    return sorted(out)


def _share(items: list[Any]) -> list[Any]:
    """This rank's share of `items`: every world-th one."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return items[rank::world]


def _gather(value: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def write_manifest(folder: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of `folder` (collective: call on every rank once all files are written);
    rank 0 writes the manifest. Returns it (on every rank)."""
    files = _broadcast(list_files(folder) if not dist.is_initialized() or dist.get_rank() == 0 else None)
    mine = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": file_sha256(os.path.join(folder, rel))}
            for rel in _share(files)}
    entries: dict[str, Any] = {}
    for part in _gather(mine):
        entries.update(part)
    manifest = {"format": 1, "algorithm": "sha256", "saved_at": time.time(), **(extra or {}),
                "files": {rel: entries[rel] for rel in files}}
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = os.path.join(folder, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, MANIFEST))
    return manifest


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of `folder`; None when it has none. Raises ValueError when it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return manifest


def _check_one(folder: str, rel: str, entry: dict[str, Any]) -> str | None:
    path = os.path.join(folder, rel)
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path} is missing"
    if size != entry["size"]:
        return f"{path} has {size} bytes, {entry['size']} were written (truncated or overwritten)"
    if file_sha256(path) != entry["sha256"]:
        return f"{path} does not match its checksum (corrupted: its content changed after the save)"
    return None


def verify(folder: str) -> tuple[list[str] | None, dict[str, Any] | None]:
    """(problems, manifest) of `folder` (collective; every rank gets the same answer). problems is
    [] when every listed file is intact and None when there is no manifest to check against."""
    def local() -> tuple[str | None, dict[str, Any] | None]:
        try:
            return None, read_manifest(folder)
        except ValueError as e:
            return str(e), None

    error, manifest = _broadcast(local() if not dist.is_initialized() or dist.get_rank() == 0 else None)
    if error is not None:
        return [error], None
    if manifest is None:
        return None, None
    items = sorted(manifest["files"].items())
    mine = [p for rel, entry in _share(items) for p in [_check_one(folder, rel, entry)] if p]
    problems = sorted(p for part in _gather(mine) for p in part)
    return problems, manifest


def folder_bytes(folder: str) -> int:
    """Total size of the files of `folder` (from its manifest when it has one)."""
    try:
        manifest = read_manifest(folder)
    except ValueError:
        manifest = None
    if manifest is not None:
        return sum(int(e["size"]) for e in manifest["files"].values())
    return sum(os.path.getsize(os.path.join(folder, rel)) for rel in list_files(folder))
