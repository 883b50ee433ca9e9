"""Process-group start-up from the configuration: backend, collective timeout, and the derived layout.

This module owns `torch.distributed.init_process_group`. Megatron's model-parallel groups are built on
top of it by the model code; dp is always derived as WORLD_SIZE / (tp * pp * cp).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from liteppo_mcore.config.schema import LitePPOConfig


@dataclass(frozen=True)
class Layout:
    """Where this process sits: world size and rank, and the parallel sizes (dp derived)."""

    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    backend: str

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def describe(self) -> str:
        return (f"world {self.world_size} = tp {self.tp} x pp {self.pp} x cp {self.cp} x dp {self.dp} "
                f"(backend {self.backend})")


def resolve_backend(requested: str) -> str:
    """auto -> nccl when CUDA is present, else gloo. nccl without CUDA is refused with the fix."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        from liteppo_mcore.config.validate import ConfigError

        raise ConfigError(["parallel.backend=nccl needs CUDA, and none is available here. "
                           "Set parallel.backend: auto (or gloo) to run on CPU."])
    return requested


def local_rank() -> int:
    """This process's index on its node, i.e. its GPU: LOCAL_RANK (torchrun), else SLURM_LOCALID (srun
    without torchrun), else 0 for a lone process. Several processes with neither would all take GPU 0,
    so that is refused with the fix."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise RuntimeError(f"{name}={value!r} is not a GPU index (a non-negative integer)")
            return int(value)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("WORLD_SIZE is > 1 but neither LOCAL_RANK nor SLURM_LOCALID is set, so every process "
                           "would use GPU 0. Launch with torchrun (it sets LOCAL_RANK), or under srun "
                           "(SLURM_LOCALID), or export LOCAL_RANK per process.")
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: LitePPOConfig) -> Layout:
    """Initialize the default process group (or reuse an existing one) and return the layout.

    Under torchrun the env:// rendezvous is used; a plain `python` run becomes a one-process group
    on a free local port, so the same code path serves both.
    """
    backend = resolve_backend(cfg.parallel.backend)
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    rank_on_node = local_rank()
    if backend == "nccl":
        torch.cuda.set_device(rank_on_node)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    p = cfg.parallel
    return Layout(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=rank_on_node,
                  tp=p.tp, pp=p.pp, cp=p.cp, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
