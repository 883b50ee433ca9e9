"""Moving idle state off the GPU between phases (`train.offload_between_phases`).

During rollout the engine wants the GPU memory; during training the engine sleeps. What can leave
the GPU without touching megatron's DDP buffers (whose parameters are views into one flat buffer):
the optimizer states (the Adam moments: 8 bytes per parameter, the largest part after the master
weights) of the actor and the critic, and the whole frozen reference model. Master weights stay: in
some layouts megatron makes them views of the model's own buffers. They go to pinned CPU memory and
come back before use.

Copies to the host go straight into pinned buffers (`torch.empty(..., pin_memory=True)` then a
non-blocking `copy_`), never through pageable memory first; one synchronisation after the last copy
makes them safe to use. On a machine without CUDA (and outside the strict virtual-device mode)
everything already lives on the CPU and these calls do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from liteppo_mcore.parallel.device import compute_device, on_gpu


def _optimizer_states(optimizer: Any) -> Iterable[dict]:
    """The per-parameter state dicts of a megatron optimizer (chained or not)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            yield from inner.state.values()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: to the host into a new pinned buffer, to a GPU without blocking."""
    if device.type == "cpu":
        target = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=on_gpu())
        target.copy_(tensor, non_blocking=True)
        return target
    return tensor.to(device, non_blocking=True)


def _synchronize() -> None:
    if on_gpu():
        torch.cuda.synchronize()  # the non-blocking copies are complete before anyone reads them


def move_optimizer_state(optimizer: Any, device: torch.device) -> int:
    """Move every optimizer state tensor to `device`; returns the bytes moved."""
    moved = 0
    for state in _optimizer_states(optimizer):
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.device == device or value.dim() == 0:
                continue  # 0-d tensors (Adam's step count) stay where the optimizer expects them
            state[key] = to_device(value, device)
            moved += value.numel() * value.element_size()
    _synchronize()
    return moved


def move_module(module: torch.nn.Module, device: torch.device) -> None:
    """Move a module that no DDP wraps (the frozen reference), parameters and buffers, the same way."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device != device:
                tensor.data = to_device(tensor.data, device)
    _synchronize()


def offload_enabled(flag: bool) -> bool:
    """Whether `train.offload_between_phases` moves anything: only on a GPU (else all is on the host)."""
    return flag and on_gpu()


@contextlib.contextmanager
def _on_device_while(move: Callable[[Any, torch.device], object], thing: Any, offload: bool) -> Iterator[Any]:
    """With `offload`: `move(thing, compute device)` before the block and `move(thing, host)` after it,
    also when the block raises. Without: nothing moves."""
    if offload:
        move(thing, compute_device())
    try:
        yield thing
    finally:
        if offload:
            move(thing, torch.device("cpu"))


def module_on_device(module: torch.nn.Module, offload: bool) -> contextlib.AbstractContextManager[torch.nn.Module]:
    """With `offload`: `module` (the frozen reference) on the compute device inside the block, back on
    the host after it, also when the block raises. Without: nothing moves."""
    return _on_device_while(move_module, module, offload)


def optimizer_state_on_device(optimizer: Any, offload: bool) -> contextlib.AbstractContextManager[Any]:
    """With `offload`: the optimizer's states (Adam moments) on the compute device inside the block (the
    update), on the host after it, also when the block raises. Without: nothing moves."""
    return _on_device_while(move_optimizer_state, optimizer, offload)
