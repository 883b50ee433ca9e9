"""Run megatron-core 0.16 on CPU with gloo: a small set of patches, active only when CUDA is absent.

megatron-core assumes a CUDA device in a few places that have nothing to do with the maths: it places
buffers on "the current CUDA device", forks the CUDA RNG around dropout, and checks `Tensor.type()`
names in the optimizer. On a machine without CUDA (CI, laptops, the embedded default) these patches
redirect that to the CPU so the same model, schedule, optimizer and checkpoint code runs unchanged.
They touch megatron internals, which is why megatron-core is pinned to one minor version.

`install()` is idempotent and does nothing when `torch.cuda.is_available()`. `install(strict=True)` (or
`LITEPPO_STRICT_DEVICE=1` in the environment) adds the strict virtual-device mode of `strict_device`:
tensors then carry the device they would have on a GPU, and host/device mixes fail as CUDA would.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from liteppo_mcore.parallel import strict_device

_INSTALLED = False
_CPU = torch.device("cpu")

# Tensor.type() names the megatron optimizer compares against (it only accepts CUDA tensors).
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


# megatron passes torch.cuda.current_device() (an int index) as a device in places
_is_cuda_device = strict_device._is_cuda


# the functions _CudaToCpuMode rewrites whatever their keyword arguments (the rest only for `device=` or
# `pin_memory=` keywords)
_REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.type, torch.Tensor.to})


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU.

    Why: megatron allocates with `device=torch.cuda.current_device()` or `"cuda"`, moves with `.cuda()`
    and `.to("cuda")`, and pins host memory for copies that never leave the CPU here.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in _REWRITTEN:  # most calls: nothing to rewrite (this runs for every torch call)
            return func(*args)
        kwargs = dict(kwargs or {})
        if strict_device.is_active():  # turned on after this mode: the strict mode does the rewrites
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Why: the optimizer asserts params are torch.cuda.*Tensor; report the CUDA name.
            name = _CUDA_TYPE_NAMES.get(args[0].dtype)
            if name is not None and args[0].device.type == "cpu":
                return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = tuple(_CPU if i > 0 and isinstance(a, (str, torch.device)) and _is_cuda_device(a) else a
                         for i, a in enumerate(args))
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Megatron's RNG-states tracker on the CPU generator.

    Why: megatron forks a named CUDA RNG state around dropout in tensor-parallel regions and around
    activation recompute; without CUDA the stock tracker fails at its first call. This keeps the same
    interface (add / fork / get_states / set_states) over torch's CPU generator.
    """

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name} is already tracked")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not tracked")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(new_state: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> None:
    return None


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Why: activation recompute saves and restores "the CUDA RNG state" next to the CPU one; there is
    # none here, and the CPU state (which drives everything on this device) is saved by megatron itself.
    mrandom._get_cuda_rng_state = _no_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_no_cuda_rng_state


def _manual_seed(seed: int, **kwargs: Any) -> None:
    """Replacement of megatron's model_parallel_cuda_manual_seed on CPU (same seeds per TP rank)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tp_rank = kwargs.get("tp_rank")
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add("data-parallel-rng", seed)
    tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
    tracker.add("expert-parallel-rng", seed + 1024)


def install(strict: bool | None = None) -> bool:
    """Apply the patches when CUDA is absent. Returns whether they are active.

    `strict` (default: `LITEPPO_STRICT_DEVICE` from the environment) also enters the strict
    virtual-device mode. It can be turned on after a plain install, never off again.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if strict is None:
        strict = strict_device.requested()
    if _INSTALLED:
        if strict and not strict_device.is_active():
            strict_device.install()
        return True
    if strict:
        # The strict mode does the placement rewrites itself, recording what each one would have been.
        strict_device.install()
    else:
        # Why: megatron asks for "the current CUDA device" to place buffers (rotary cache, p2p buffers,
        # grad buffers); the CPU is the only device here.
        # A device, not an index, on purpose (megatron passes it on as device=): hence the ignore.
        torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment, return-value]
        # Why: megatron synchronizes around timers and p2p; nothing is asynchronous on the CPU.
        torch.cuda.synchronize = lambda *a, **k: None
        _CudaToCpuMode().__enter__()
    _install_rng_tracker()
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.model_parallel_cuda_manual_seed = _manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = _manual_seed
    _INSTALLED = True
    return True


def is_active() -> bool:
    return _INSTALLED


def is_strict() -> bool:
    """Whether the strict virtual-device mode is on (tensors carry their would-be GPU placement)."""
    return strict_device.is_active()
