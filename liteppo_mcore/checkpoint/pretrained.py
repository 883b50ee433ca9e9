"""Starting the actor from pretrained weights: a converted checkpoint (`model.load`) or a Hugging Face
directory (`model.hf_path`).

A Hugging Face directory is streamed straight into this rank's shards on the first run (any TP/PP
layout: each rank reads, fuses and shards one tensor at a time) and the result is saved as a converted
checkpoint under `<output_dir>/pretrained/`; later runs load that instead, as long as it still matches
its source (path, config.json and weight files' sizes and modification times).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from liteppo_mcore.checkpoint.paths import (
    CheckpointError,
    checkpoints_dir,
    iteration_dir,
    read_latest,
    resolve_iteration_dir,
)
from liteppo_mcore.checkpoint.store import (
    load_model,
    read_checkpoint_config,
    read_source,
    save_checkpoint,
    sharded_model_state,
)
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.convert.hf_files import CONFIG, SafetensorsReader, normalize_config, read_config, weights_fingerprint
from liteppo_mcore.convert.layout import TensorLayout
from liteppo_mcore.convert.weights import MegatronView, check_hf_tensors
from liteppo_mcore.models.shapes import ModelShape, resolve_shape, shape_from_hf_config
from liteppo_mcore.models.state import load_whole_state_dict
from liteppo_mcore.parallel.mcore import ParallelGroups

PRETRAINED_SUBDIR = "pretrained"


def hf_shape(hf_config: dict[str, Any], where: str = CONFIG) -> ModelShape:
    """The shape of a Hugging Face config, whichever way transformers wrote its rope settings."""
    return shape_from_hf_config(normalize_config(hf_config), where)


def pretrained_shape(cfg: LitePPOConfig, vocab_size: int | None = None) -> ModelShape:
    """The shape to build: hf_path's config.json, else the config stored in model.load's checkpoint,
    else the YAML section (also for a checkpoint that stores no config)."""
    m = cfg.model
    if m.hf_path:
        shape = hf_shape(read_config(m.hf_path), os.path.join(m.hf_path, CONFIG))
    elif m.load:
        iter_dir = resolve_iteration_dir(m.load)
        stored = read_checkpoint_config(iter_dir, required=False)
        if stored is None:
            return resolve_shape(m, vocab_size)
        shape = hf_shape(stored, os.path.join(iter_dir, "hf", CONFIG))
    else:
        return resolve_shape(m, vocab_size)
    return replace(shape, vocab_size=m.vocab_size) if m.vocab_size else shape


def source_record(hf_dir: str) -> dict[str, Any]:
    """What a conversion came from, to tell whether a cached one is still valid."""
    return {"hf_path": os.path.abspath(hf_dir), "files": weights_fingerprint(hf_dir)}


@torch.no_grad()
def load_actor_from_hf(actor: torch.nn.Module, hf_dir: str, groups: ParallelGroups, shape: ModelShape) -> None:
    """Stream a Hugging Face checkpoint into this rank's shards of `actor` (collective-free)."""
    hf = read_config(hf_dir)
    layout = TensorLayout.from_shape(hf_shape(hf, os.path.join(hf_dir, CONFIG)))
    reader = SafetensorsReader(hf_dir)
    try:
        check_hf_tensors(reader, layout)
        load_whole_state_dict(actor, MegatronView(reader, layout), groups, shape.vocab_size)
    finally:
        reader.close()


def save_converted_actor(actor: torch.nn.Module, run_dir: str, hf_dir: str) -> str:
    """Save `actor` as iteration 0 of `run_dir` with `hf_dir`'s config and tokenizer (collective);
    an earlier iteration 0 there is replaced."""
    if dist.get_rank() == 0:
        stale = iteration_dir(run_dir, 0)
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        latest = os.path.join(checkpoints_dir(run_dir), "latest")
        if os.path.isfile(latest):
            os.remove(latest)
    dist.barrier()
    return save_checkpoint(sharded_model_state({"actor": actor}), run_dir, 0, hf_config=read_config(hf_dir),
                           side_files_from=hf_dir, source=source_record(hf_dir))


def cached_conversion(run_dir: str, hf_dir: str) -> str | None:
    """The iteration folder of a still-valid conversion of `hf_dir` in `run_dir`, else None."""
    try:
        if read_latest(checkpoints_dir(run_dir)) is None:
            return None
        iter_dir = resolve_iteration_dir(run_dir)
    except CheckpointError:
        return None
    return iter_dir if read_source(iter_dir) == source_record(hf_dir) else None


def _rank0_decides(value: str | None) -> str | None:
    """Every rank takes rank 0's answer, so that all of them go down the same collective path."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_pretrained_actor(actor: torch.nn.Module, cfg: LitePPOConfig, groups: ParallelGroups,
                          shape: ModelShape) -> str | None:
    """Load the actor's starting weights (collective); returns where they came from, or None when the
    configuration names none (random initialization). `model.load` wins over `model.hf_path`."""
    m = cfg.model
    if m.load:
        iter_dir = resolve_iteration_dir(m.load)
        load_model(actor, iter_dir, "actor")
        return iter_dir
    if not m.hf_path:
        return None
    cache = os.path.join(cfg.output_dir, PRETRAINED_SUBDIR)
    cached = _rank0_decides(cached_conversion(cache, m.hf_path) if dist.get_rank() == 0 else None)
    if cached is not None:
        load_model(actor, cached, "actor")
        return cached
    load_actor_from_hf(actor, m.hf_path, groups, shape)
    save_converted_actor(actor, cache, m.hf_path)
    return m.hf_path


def build_pretrained_models(cfg: LitePPOConfig, groups: ParallelGroups, *, vocab_size: int | None = None):
    """The configuration's models with the actor's starting weights (collective): the actor is built,
    loaded (`model.load`, else `model.hf_path`, else left random), and then the critic and the reference
    are derived from it, so both start from what the actor starts from; `critic.load` then replaces the
    critic's weights with a checkpoint's critic. Returns models.gpt.Models."""
    # megatron's model classes are imported here, at first use: the conversion tools import this package
    # without building a model (and without megatron's import-time warnings)
    from liteppo_mcore.models.gpt import build_actor, derive_models

    shape = pretrained_shape(cfg, vocab_size)
    actor = build_actor(cfg, groups, shape)
    load_pretrained_actor(actor, cfg, groups, shape)
    models = derive_models(actor, cfg, groups, shape)
    if cfg.critic.load and models.critic is not None:  # a trained critic instead of the actor's trunk
        load_model(models.critic, resolve_iteration_dir(cfg.critic.load), "critic")
    return models
