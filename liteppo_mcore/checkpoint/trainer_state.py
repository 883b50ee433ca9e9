"""What a trainer checkpoint holds, and the collective calls that write and read it.

    iter_NNNNNNN/   sharded: actor.*, critic.*, reference.* (when it cannot be rebuilt), optimizer
                    states (their keys hold the model prefix); common state `liteppo`: the trainer's
                    own state (step, KL controller, running moments, data position, update counters,
                    the resolved config) and the world size; hf/ (config + tokenizer);
                    rng/rank_<r>.pt: this rank's RNG states; checksums.json (manifest.py)

The folder-level protocol (temporary name, checksums, rename, `latest`, retention, fallback) is the
Checkpointer's (checkpointer.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from liteppo_mcore.checkpoint.store import COMMON_KEY, FORMAT_VERSION, check_against_checkpoint
from liteppo_mcore.checkpoint.strategies import (
    init_empty_optimizer_states,
    load_kwargs,
    load_optimizer_state_dict,
    optimizer_metadata,
    save_kwargs,
)

if TYPE_CHECKING:  # only for the annotations
    from megatron.core.transformer.module import MegatronModule

RNG_SUBDIR = "rng"




def sharded_state(models: Mapping[str, MegatronModule], optimizers: Mapping[str, Any],
                  is_loading: bool) -> dict[str, Any]:
    """One sharded state dict of the models (under `<name>.`) and their optimizers."""
    state: dict[str, Any] = {}
    for name, model in models.items():
        model_sd = model.sharded_state_dict(prefix=f"{name}.")
        state.update(model_sd)
        if name in optimizers:
            state[f"optimizer_{name}"] = optimizers[name].sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=optimizer_metadata())
    return state


def rng_state() -> dict[str, Any]:
    """This rank's RNG states: Python, numpy, torch's CPU generator, the CUDA generator of this
    rank's device (on GPUs) and megatron's model-parallel RNG tracker (dropout, initialization)."""
    from megatron.core import tensor_parallel

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # a real generator (the strict virtual-device mode has none)
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if getattr(tracker, "is_initialized", lambda: True)():
        state["tracker"] = {name: s.clone() for name, s in tracker.get_states().items()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in this thread while the block runs, and so in the writer processes
    megatron forks meanwhile: torchrun signals a rank's whole process group, which would kill the
    writers of the very save the signal asks for. Held signals arrive (to the trainer's handler) after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def write_trainer_state(folder: str, *, models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, Any],
                        common: dict[str, Any], parallel_group: Any) -> None:
    """Write the models, optimizers, common state and this rank's RNG states into `folder` (collective;
    the writing of replicated shards is spread over `parallel_group`, the data-parallel ranks)."""
    from megatron.core import dist_checkpointing

    state = sharded_state(models, optimizers, is_loading=False)
    state[COMMON_KEY] = {"format": FORMAT_VERSION, "models": sorted(models), "world_size": dist.get_world_size(),
                         **common}
    with stop_signals_held():
        dist_checkpointing.save(state, folder, **save_kwargs(parallel_group))
    os.makedirs(os.path.join(folder, RNG_SUBDIR), exist_ok=True)
    torch.save(rng_state(), os.path.join(folder, RNG_SUBDIR, f"rank_{dist.get_rank()}.pt"))


def read_trainer_state(folder: str, *, models: Mapping[str, torch.nn.Module], optimizers: Mapping[str, Any],
                       parallel_group: Any, fully_parallel: bool = True) -> dict[str, Any]:
    """Load the models and optimizers saved in `folder` (at any layout) into these (collective);
    returns the common state. RNG states are restored only at the world size they were saved at:
    elsewhere the ranks keep the fresh states this run seeded (from `seed`, and the TP/PP rank for
    megatron's tracker), and the returned state says so under `rng_restored`.

    `fully_parallel`: read each replicated shard once per data-parallel group and broadcast it
    (strategies.py load_kwargs; off for the distributed optimizer, where it costs a second host copy)."""
    from megatron.core import dist_checkpointing

    for optimizer in optimizers.values():
        init_empty_optimizer_states(optimizer)  # a distributed optimizer that has not stepped yet
    state = sharded_state(models, optimizers, is_loading=True)
    for name in models:
        check_against_checkpoint({k: v for k, v in state.items() if k.startswith(name + ".")}, folder, name)
    loaded = dist_checkpointing.load(state, folder, **load_kwargs(parallel_group, fully_parallel=fully_parallel))
    for name, model in models.items():
        mine = {k[len(name) + 1:]: v for k, v in loaded.items() if k.startswith(name + ".")}
        model.load_state_dict(mine, strict=True)
        if name in optimizers:
            load_optimizer_state_dict(optimizers[name], loaded[f"optimizer_{name}"])
    common = dict(loaded[COMMON_KEY])
    rng = os.path.join(folder, RNG_SUBDIR, f"rank_{dist.get_rank()}.pt")
    same_world = common.get("world_size", dist.get_world_size()) == dist.get_world_size()
    common["rng_restored"] = same_world and os.path.isfile(rng)
    if common["rng_restored"]:
        set_rng_state(torch.load(rng, weights_only=False))
    return common


def checkpoint_common(folder: str) -> dict[str, Any]:
    """The `liteppo` common state of a checkpoint (step, models, the resolved config, ...)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(folder).get(COMMON_KEY, {})
