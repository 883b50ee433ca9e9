"""The whole trainer state in one distributed checkpoint, written atomically, resumable at any layout.

    RUN_DIR/checkpoints/iter_NNNNNNN/   sharded: actor.*, critic.*, reference.* (when it cannot be rebuilt),
                                        optimizer states (their keys hold the model prefix), common state
                                        `liteppo`: step, KL controller, running moments, data position,
                                        update counters, the resolved config; hf/ (config + tokenizer)
                                        rng/rank_<r>.pt: this rank's RNG states

The folder is written under a temporary name and renamed when complete; `latest` moves last. A
process killed while saving leaves the previous checkpoint as `latest`, intact.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from liteppo_mcore.checkpoint.paths import checkpoints_dir, iteration_dir, write_latest
from liteppo_mcore.checkpoint.store import COMMON_KEY, FORMAT_VERSION, check_against_checkpoint, write_hf_side

# Megatron's distributed optimizer can be saved in a layout-independent form; other optimizers are
# sharded like their parameters and reshard like them.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
PARTIAL_SUFFIX = ".partial"


def _sharded_state(models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, Any],
                   is_loading: bool) -> Dict[str, Any]:
    state: Dict[str, Any] = {}
    for name, model in models.items():
        model_sd = model.sharded_state_dict(prefix=f"{name}.")
        state.update(model_sd)
        if name in optimizers:
            state[f"optimizer_{name}"] = optimizers[name].sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=dict(_OPTIM_METADATA))
    return state


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_trainer_checkpoint(run_dir: str, step: int, *, models: Mapping[str, torch.nn.Module],
                            optimizers: Mapping[str, Any], common: Dict[str, Any], hf_config: Dict[str, Any],
                            side_files_from: Optional[str] = None) -> str:
    """Save everything (collective over all ranks); returns the iteration folder once `latest` names it."""
    final = iteration_dir(run_dir, step)
    partial = final + PARTIAL_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(checkpoints_dir(run_dir), exist_ok=True)
        for stale in (partial, final):  # leftovers of a killed save, or a re-run of this step
            if os.path.isdir(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
    dist.barrier()
    state = _sharded_state(models, optimizers, is_loading=False)
    state[COMMON_KEY] = {"format": FORMAT_VERSION, "iteration": step, "models": sorted(models), **common}
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, partial)
    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        write_hf_side(partial, hf_config, side_files_from)
        os.replace(partial, final)
        write_latest(checkpoints_dir(run_dir), step)
    dist.barrier()
    return final


def load_trainer_checkpoint(iter_dir: str, *, models: Mapping[str, torch.nn.Module],
                            optimizers: Mapping[str, Any]) -> Dict[str, Any]:
    """Load the models and optimizers saved in `iter_dir` (at any layout) into these; returns the
    common state. RNG states are restored when this rank saved some (same world size)."""
    from megatron.core import dist_checkpointing

    state = _sharded_state(models, optimizers, is_loading=True)
    for name in models:
        check_against_checkpoint({k: v for k, v in state.items() if k.startswith(name + ".")}, iter_dir, name)
    loaded = dist_checkpointing.load(state, iter_dir)
    for name, model in models.items():
        mine = {k[len(name) + 1:]: v for k, v in loaded.items() if k.startswith(name + ".")}
        model.load_state_dict(mine, strict=True)
        if name in optimizers:
            optimizers[name].load_state_dict(loaded[f"optimizer_{name}"])
    rng = os.path.join(iter_dir, "rng", f"rank_{dist.get_rank()}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    return loaded[COMMON_KEY]


def checkpoint_common(iter_dir: str) -> Dict[str, Any]:
    """The `liteppo` common state of a checkpoint (step, models, the resolved config, ...)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(iter_dir).get(COMMON_KEY, {})
