"""Moving idle state off the GPU between phases (`train.offload_between_phases`).

During rollout the engine wants the GPU memory; during training the engine sleeps. What can leave
the GPU without touching megatron's DDP buffers (whose parameters are views into one flat buffer):
the optimizer states (the Adam moments: 8 bytes per parameter, the largest part after the master
weights) of the actor and the critic, and the whole frozen reference model. Master weights stay: in
some layouts megatron makes them views of the model's own buffers. They go to pinned CPU memory and come back before use.
On a machine without CUDA everything already lives on the CPU and these calls do nothing.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def _optimizer_states(optimizer: Any) -> Iterable[dict]:
    """The per-parameter state dicts of a megatron optimizer (chained or not)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield from inner.state.values()


def move_optimizer_state(optimizer: Any, device: torch.device) -> int:
    """Move every optimizer state tensor to `device`; returns the bytes moved."""
    moved = 0
    for state in _optimizer_states(optimizer):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.device == device or value.dim() == 0:
                continue  # 0-d tensors (Adam's step count) stay where the optimizer expects them
            target = value.to(device)
            state[key] = target.pin_memory() if device.type == "cpu" and torch.cuda.is_available() else target
            moved += value.numel() * value.element_size()
    return moved


def move_module(module: torch.nn.Module, device: torch.device) -> None:
    """Move a module that no DDP wraps (the frozen reference) with its buffers."""
    module.to(device)


def offload_enabled(flag: bool) -> bool:
    return flag and torch.cuda.is_available()
