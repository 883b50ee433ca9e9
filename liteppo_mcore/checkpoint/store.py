"""Saving and loading models in megatron-core distributed checkpoints (torch_dist), keyed by model.

An iteration folder holds one distributed checkpoint whose sharded keys start with the model they
belong to (`actor.`, `critic.`, `reference.`); an optimizer's states are keyed by their parameter's key
(`optimizer.state.exp_avg.actor.decoder...`; the trainer's state dict holds each optimizer under
`optimizer_{model}`, checkpoint/trainer_state.py), a small common state
under `liteppo` (format, iteration, models), and `hf/`: the Hugging Face config.json the shapes come
from, plus the tokenizer/generation files when there are any, so a checkpoint converts back to
Hugging Face with nothing else. torch_dist checkpoints reshard on load: any TP/PP layout reads them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from liteppo_mcore.checkpoint.paths import HF_SUBDIR, CheckpointError, checkpoints_dir, iteration_dir, write_latest
from liteppo_mcore.convert.hf_files import CONFIG, copy_side_files, write_json_atomic

if TYPE_CHECKING:  # only for the annotations
    from megatron.core.transformer.module import MegatronModule

COMMON_KEY = "liteppo"
FORMAT_VERSION = 1
MODEL_PREFIXES = ("actor", "critic", "reference")
SOURCE_FILE = "source.json"  # in hf/: what the checkpoint was converted from (cache validation)


def sharded_model_state(models: Mapping[str, MegatronModule]) -> dict[str, Any]:
    """One sharded state dict of several models, each under `<prefix>.`."""
    sharded: dict[str, Any] = {}
    for prefix, model in models.items():
        sharded.update(model.sharded_state_dict(prefix=f"{prefix}."))
    return sharded


def save_checkpoint(sharded: dict[str, Any], run_dir: str, iteration: int, *, hf_config: dict[str, Any],
                    side_files_from: str | None = None, source: dict[str, Any] | None = None,
                    common: dict[str, Any] | None = None) -> str:
    """Save `sharded` as `run_dir/checkpoints/iter_<iteration>` (collective over every rank), then the
    Hugging Face side files, then point `latest` at it. Returns the iteration folder.

    `common` (plain, identical on every rank) joins the `liteppo` common state.
    """
    iter_dir = iteration_dir(run_dir, iteration)
    if dist.get_rank() == 0:
        os.makedirs(iter_dir, exist_ok=True)
    dist.barrier()
    models = sorted({k.split(".", 1)[0] for k in sharded} & set(MODEL_PREFIXES))
    state = dict(sharded)
    state[COMMON_KEY] = {"format": FORMAT_VERSION, "iteration": iteration, "models": models, **(common or {})}
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, iter_dir)
    if dist.get_rank() == 0:
        write_hf_side(iter_dir, hf_config, side_files_from, source)
        write_latest(checkpoints_dir(run_dir), iteration)
    dist.barrier()
    return iter_dir


def write_hf_side(iter_dir: str, hf_config: dict[str, Any], side_files_from: str | None = None,
                  source: dict[str, Any] | None = None) -> None:
    """`iter_dir/hf/`: config.json (verbatim when copied from a HF directory), tokenizer files, source."""
    hf_dir = os.path.join(iter_dir, HF_SUBDIR)
    os.makedirs(hf_dir, exist_ok=True)
    original = os.path.join(side_files_from, CONFIG) if side_files_from else ""
    if os.path.isfile(original) and _read_json(original) == hf_config:
        shutil.copyfile(original, os.path.join(hf_dir, CONFIG))
    else:
        write_json_atomic(os.path.join(hf_dir, CONFIG), hf_config)
    if side_files_from:
        copy_side_files(side_files_from, hf_dir)
    if source is not None:
        write_json_atomic(os.path.join(hf_dir, SOURCE_FILE), source)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hf_side_dir(iter_dir: str) -> str:
    return os.path.join(iter_dir, HF_SUBDIR)


def read_checkpoint_config(iter_dir: str, required: bool = True) -> dict[str, Any] | None:
    """The Hugging Face config.json stored in a checkpoint (None when absent and not required)."""
    path = os.path.join(hf_side_dir(iter_dir), CONFIG)
    if not os.path.isfile(path):
        if not required:
            return None
        raise CheckpointError(f"{iter_dir}: no {HF_SUBDIR}/{CONFIG} in this checkpoint, so its architecture is "
                              "unknown. Copy the model's Hugging Face config.json (and tokenizer files) into "
                              f"{HF_SUBDIR}/ of the iteration folder.")
    return _read_json(path)


def read_source(iter_dir: str) -> dict[str, Any] | None:
    path = os.path.join(hf_side_dir(iter_dir), SOURCE_FILE)
    if not os.path.isfile(path):
        return None
    return _read_json(path)


def check_against_checkpoint(sharded: dict[str, Any], iter_dir: str, prefix: str) -> None:
    """Missing tensors and shape disagreements, named, before megatron's loader would fail deep inside."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stored = dist_checkpointing.load_tensors_metadata(iter_dir)
    if not any(key.startswith(prefix + ".") for key in stored):
        models = sorted({key.split(".", 1)[0] for key in stored})
        raise CheckpointError(f"{iter_dir}: no '{prefix}.' tensors in this checkpoint (it holds {models}).")
    for value in sharded.values():
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue  # sharded objects (extra state) are stored apart from the tensors
        key = value.key
        if key not in stored:
            raise CheckpointError(f"{iter_dir}: tensor {key} is not in the checkpoint. The model built here "
                                  "does not match the checkpoint's (check hf_path / the stored hf/config.json).")
        if isinstance(value, ShardedTensor) and not value.allow_shape_mismatch:
            want, have = tuple(value.global_shape), tuple(stored[key].global_shape)
            if want != have:
                raise CheckpointError(f"{iter_dir}: tensor {key} has shape {list(have)} in the checkpoint but "
                                      f"the model built here needs {list(want)}. Build the model from the "
                                      "checkpoint's own config (model.load without a different hf_path).")


@torch.no_grad()
def load_model(model: MegatronModule, iter_dir: str, prefix: str = "actor") -> None:
    """Load this rank's shards of `prefix.` from a checkpoint saved at any layout (collective)."""
    from megatron.core import dist_checkpointing

    from liteppo_mcore.checkpoint.lock import reading

    sharded = model.sharded_state_dict(prefix=f"{prefix}.")
    check_against_checkpoint(sharded, iter_dir, prefix)
    with reading(iter_dir):  # a run's retention leaves the folder alone meanwhile
        loaded = dist_checkpointing.load(sharded, iter_dir)
    mine = {k[len(prefix) + 1:]: v for k, v in loaded.items() if k.startswith(prefix + ".")}
    model.load_state_dict(mine, strict=True)
