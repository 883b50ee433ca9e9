"""Strict virtual-device mode: on a machine without CUDA, every tensor carries the device it WOULD have
on a CUDA machine ("device" or "host") while its data stays on the CPU, and code that mixes the two
fails as it would on a GPU.

Why: the CPU compatibility layer (``cpu_compat``) redirects every CUDA placement to the CPU, so a tensor
that is on the wrong device on a GPU machine is on the right one in a CPU test. With this mode the CPU
suite catches that class of bugs: a parameter created without a device in a model that megatron puts on
the GPU, a batch built on the CPU fed to a device model, a host statistic all-reduced over NCCL.

How (read against torch 2.13's dispatcher; no internals beyond public ``TorchFunctionMode``,
``TorchDispatchMode`` and storage handles):

- The virtual device is a property of the *storage*: views, ``.data``, ``nn.Parameter``, in-place ops
  and ``param.data = ...`` share or swap storages, so they keep (or take) the right device for free.
  A table maps each live storage to a ``Placement`` (device or host, pinned, and where it was made).
- A ``TorchFunctionMode`` sees the Python calls: factories and moves that ask for CUDA
  (``device="cuda"``, an int index, ``torch.cuda.current_device()``, ``.cuda()``, ``.to("cuda")``,
  ``.to(other)``) make device storages; ``.cpu()`` / ``.to("cpu")`` / factories without a device make
  host ones; a move between the two always copies (as on a GPU). ``Tensor.device``, ``is_cuda``,
  ``get_device()``, ``type()``, ``is_pinned()`` and ``numpy()`` answer as CUDA would.
- A ``TorchDispatchMode`` sees every aten op, the autograd engine's backward ops included: results take
  their inputs' device, and an op whose tensor inputs mix device and host fails with the error CUDA
  gives, naming the op, the shapes and where each input was made. CUDA's own exceptions are kept: a
  0-dim host tensor may be an operand of an element-wise op (not the condition of ``where``), host index
  tensors may index a device tensor, and copies may cross.
- c10d collectives over a group that is NCCL on a GPU machine (every group but those created with
  ``backend="gloo"`` on purpose) fail on a host tensor. Object collectives (``all_gather_object`` and
  friends) are exempt: torch moves their buffers itself.

Tensors made where neither mode can tell (inside torch's own Python functions, or by C++ with no Python
call in flight, such as the allocations of backward formulas) are "unplaced": they take the device of
whatever they are combined with, so the mode never fails on what torch does by itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST, DEVICE = "host", "device"
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where a storage would live on a CUDA machine, and where (file:line) it was placed there."""

    kind: str             # HOST or DEVICE
    where: str
    pinned: bool = False
    derived: bool = False  # computed by ops from a tensor placed at `where` (not placed there itself)


_UNKNOWN_HOST = Placement(HOST, "made outside the tracked calls (e.g. torch.load, from_numpy)")


class StrictDeviceError(RuntimeError):
    """A host/device mix that CUDA would refuse (subclass of RuntimeError, like CUDA's own error)."""


# ---------------------------------------------------------------------------------------------------
# The storage -> placement table


class _Table:
    """Live storages (by their C++ address, held by a weak reference so the address is not reused)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, Placement]] = {}
        self._inserts = 0
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor) -> Placement | None:
        key = _storage_key(tensor)
        if key is None:
            return None
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def set(self, tensor: torch.Tensor, placement: Placement) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse, nested or meta tensors: nothing to track
        key = storage._cdata
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._entries[key] = (old[0], placement)
                return
            # torch annotates _weak_ref as returning a storage; it returns the weak reference's int handle
            self._entries[key] = (storage._weak_ref(), placement)  # type: ignore[assignment]
            self._inserts += 1
            if self._inserts % 8192 == 0:
                self._purge()

    def _purge(self) -> None:
        dead = [k for k, (ref, _) in self._entries.items() if torch.UntypedStorage._expired(ref)]
        for k in dead:
            ref, _ = self._entries.pop(k)
            torch.UntypedStorage._free_weak_ref(ref)

    def __len__(self) -> int:
        return len(self._entries)


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


_TABLE = _Table()
_STATE = threading.local()   # .factory: Placement for new storages of the Python call in flight
_OBJECT_COLLECTIVE = threading.local()
_HOST_GROUPS: set = set()    # names of process groups created as gloo on purpose
_ACTIVE = False


def placement(tensor: torch.Tensor) -> Placement | None:
    """The tensor's virtual placement, or None when it was made where the mode could not tell."""
    return _TABLE.get(tensor)


def is_device(tensor: torch.Tensor) -> bool:
    p = _TABLE.get(tensor)
    return p is not None and p.kind == DEVICE


def is_active() -> bool:
    return _ACTIVE


def is_host_group(group: dist.ProcessGroup | None) -> bool:
    """Whether `group` was created as gloo on purpose (its collectives take host tensors)."""
    if group is None:
        group = dist.group.WORLD
    return getattr(group, "group_name", None) in _HOST_GROUPS


def local_device_index() -> int:
    """The GPU this process would use: LOCAL_RANK under torchrun, SLURM_LOCALID under srun."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def virtual_device() -> torch.device:
    return torch.device("cuda", local_device_index())


# ---------------------------------------------------------------------------------------------------
# Where a call came from

_SKIP_PARTS = (os.sep + "torch" + os.sep, os.sep + "contextlib.py", __file__)


def _caller() -> str:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in _SKIP_PARTS):
            parts = name.split(os.sep)
            return f"{os.sep.join(parts[-3:])}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "torch internals"


# ---------------------------------------------------------------------------------------------------
# Devices named in Python calls


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _kind_of_device(device: Any) -> str | None:
    """DEVICE for a CUDA device argument, HOST for the CPU, None for no device (or meta and the like)."""
    if device is None:
        return None
    if _is_cuda(device):
        return DEVICE
    if (device.type if isinstance(device, torch.device) else str(device).split(":")[0]) == "cpu":
        return HOST
    return None


def _describe(tensor: torch.Tensor) -> str:
    p = _TABLE.get(tensor)
    dtype = str(tensor.dtype).replace("torch.", "")
    shape = list(tensor.shape)
    if p is None:
        return f"{dtype}{shape} (unplaced)"
    where = f"on cuda:{local_device_index()}" if p.kind == DEVICE else "on cpu"
    how = "computed from a tensor placed at" if p.derived else "placed at"
    return f"{dtype}{shape} {where}, {how} {p.where}"


_DERIVED: dict[tuple[str, str], Placement] = {}


def _derived(p: Placement) -> Placement:
    """The placement of op results computed from a tensor placed as `p` (one shared object per site)."""
    if p.derived:
        return p
    key = (p.kind, p.where)
    found = _DERIVED.get(key)
    if found is None:
        found = _DERIVED[key] = Placement(p.kind, p.where, derived=True)
    return found


_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.range, torch.linspace,
    torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor,
    torch.empty_strided, torch.scalar_tensor, torch.as_tensor, torch.asarray, torch.from_numpy,
    torch.frombuffer, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.randint_like, torch.normal, torch.bernoulli,
    torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
    torch.Tensor.new_tensor,
}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
         torch.randn_like, torch.randint_like, torch.Tensor.new_empty, torch.Tensor.new_zeros,
         torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor}

_CUDA_TYPE = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
              torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
              torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
              torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor",
              torch.int8: "torch.cuda.CharTensor", torch.int16: "torch.cuda.ShortTensor"}


@contextlib.contextmanager
def _factory(placement_: Placement | None) -> Iterator[None]:
    previous = getattr(_STATE, "factory", None)
    _STATE.factory = placement_
    try:
        yield
    finally:
        _STATE.factory = previous


def _copy_to(tensor: torch.Tensor, placement_: Placement, dtype: torch.dtype | None,
             memory_format: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = {"copy": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if memory_format is not None:
        kwargs["memory_format"] = memory_format
    with _factory(placement_):
        out = tensor.to(**kwargs)
    _TABLE.set(out, placement_)
    return out


class _Move(torch.autograd.Function):
    """A move between host and device that autograd sees as one: its backward moves the gradient back
    to where the input was (the CPU copy underneath would leave it where the output is)."""

    @staticmethod
    def forward(ctx, tensor, placement_, dtype, memory_format):
        source = _TABLE.get(tensor)
        ctx.source = Placement(source.kind if source is not None else HOST, f"the backward of the move at "
                               f"{placement_.where}")
        ctx.dtype = tensor.dtype
        return _copy_to(tensor, placement_, dtype, memory_format)

    @staticmethod
    def backward(ctx, grad):
        return _copy_to(grad, ctx.source, ctx.dtype, None), None, None, None


def _moved(tensor: torch.Tensor, kind: str, dtype: torch.dtype | None, memory_format: Any,
           where: str, pinned: bool = False) -> torch.Tensor:
    """A new tensor with the data of `tensor` on `kind` (a move between device and host copies)."""
    placement_ = Placement(kind, where, pinned)
    if tensor.requires_grad and torch.is_grad_enabled():
        return _Move.apply(tensor, placement_, dtype, memory_format)
    return _copy_to(tensor, placement_, dtype, memory_format)


def _target_of_to(args: tuple, kwargs: dict) -> tuple[str | None, torch.dtype | None, bool, Any, Any]:
    """(target kind, dtype, copy, memory_format, device argument) of a Tensor.to call."""
    rest = list(args[1:])
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    copy = bool(kwargs.get("copy", False))
    memory_format = kwargs.get("memory_format")
    kind = None
    for item in rest:
        if isinstance(item, torch.Tensor):
            p = _TABLE.get(item)
            kind = p.kind if p is not None else HOST
            dtype = dtype or item.dtype
        elif isinstance(item, torch.dtype):
            dtype = item
        elif isinstance(item, (str, torch.device, int)) and not isinstance(item, bool):
            device = item
        elif isinstance(item, bool):
            pass  # non_blocking / copy positional flags
    if device is not None:
        kind = _kind_of_device(device)
    if len(rest) >= 3 and isinstance(rest[2], bool):
        copy = copy or rest[2]
    return kind, dtype, copy, memory_format, device


class StrictFunctionMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU and records what they would have been (module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        handler = _SPECIAL.get(func)
        if handler is not None:
            return handler(args, kwargs)
        pinned = bool(kwargs.pop("pin_memory", False))
        kind = None
        if kwargs.get("device") is not None:
            kind = _kind_of_device(kwargs["device"])
            if kind == DEVICE:
                kwargs["device"] = _CPU
            elif kind is None:  # meta and other devices: not ours to place
                with _factory(None):
                    return func(*args, **kwargs)
        if kind is None and func in _FACTORIES and func not in _LIKE:
            kind = HOST
        if kind is None and not pinned:
            if getattr(_STATE, "factory", None) is None:  # the common case: nothing to mask
                return func(*args, **kwargs)
            with _factory(None):
                return func(*args, **kwargs)
        p = Placement(kind or HOST, _caller(), pinned and kind != DEVICE)
        if pinned and kind == DEVICE:
            raise StrictDeviceError(f"{_name(func)}: pin_memory=True with a CUDA device at {p.where} "
                                    "(only CPU memory can be pinned)")
        with _factory(p):
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and func not in (torch.as_tensor, torch.asarray, torch.from_numpy,
                                                          torch.frombuffer):
            _TABLE.set(out, p)
        elif isinstance(out, torch.Tensor) and _TABLE.get(out) is None:
            _TABLE.set(out, p)
        return out


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)


def _to(args: tuple, kwargs: dict) -> torch.Tensor:
    src = args[0]
    kind, dtype, copy, memory_format, device = _target_of_to(args, kwargs)
    if device is not None and kind is None:  # meta and other devices: not ours to place
        with _factory(None):
            return src.to(*args[1:], **kwargs)
    current = _TABLE.get(src)
    current_kind = current.kind if current is not None else None
    if kind is None or kind == current_kind or (current_kind is None and kind == HOST):
        out = src.to(**{k: v for k, v in (("dtype", dtype), ("copy", copy or None),
                                           ("memory_format", memory_format)) if v is not None})
        if out is not src and _TABLE.get(out) is None and current is not None:
            _TABLE.set(out, current)
        return out
    return _moved(src, kind, dtype, memory_format, _caller())


def _cuda(args: tuple, kwargs: dict) -> torch.Tensor:
    src = args[0]
    if is_device(src):
        return src
    return _moved(src, DEVICE, None, kwargs.get("memory_format"), _caller())


def _cpu(args: tuple, kwargs: dict) -> torch.Tensor:
    src = args[0]
    if not is_device(src):
        return src
    return _moved(src, HOST, None, kwargs.get("memory_format"), _caller())


def _pin_memory(args: tuple, kwargs: dict) -> torch.Tensor:
    src = args[0]
    if is_device(src):
        raise StrictDeviceError(f"cannot pin '{_CUDA_TYPE.get(src.dtype, 'torch.cuda.Tensor')}' only dense "
                                f"CPU tensors can be pinned (strict virtual-device mode; tensor "
                                f"{_describe(src)})")
    return _moved(src, HOST, None, None, _caller(), pinned=True)


def _is_pinned(args: tuple, kwargs: dict) -> bool:
    p = _TABLE.get(args[0])
    return p is not None and p.pinned


def _device_get(args: tuple, kwargs: dict) -> torch.device:
    return virtual_device() if is_device(args[0]) else args[0].device  # (the real one: meta stays meta)


def _is_cuda_get(args: tuple, kwargs: dict) -> bool:
    return is_device(args[0])


def _is_cpu_get(args: tuple, kwargs: dict) -> bool:
    return not is_device(args[0]) and args[0].is_cpu


def _get_device(args: tuple, kwargs: dict) -> int:
    return local_device_index() if is_device(args[0]) else -1


def _type(args: tuple, kwargs: dict) -> Any:
    tensor = args[0]
    if len(args) == 1 and not kwargs:
        if is_device(tensor):
            return _CUDA_TYPE.get(tensor.dtype, "torch.cuda.Tensor")
        return torch.Tensor.type(tensor)
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(target, str) and target.startswith("torch.cuda."):
        out = torch.Tensor.type(tensor, target.replace("torch.cuda.", "torch."))
        return out if is_device(tensor) else _moved(out, DEVICE, None, None, _caller())
    return torch.Tensor.type(*args, **kwargs)


def _numpy(args: tuple, kwargs: dict) -> Any:
    if is_device(args[0]):
        raise TypeError(f"can't convert cuda:{local_device_index()} device type tensor to numpy. Use "
                        f"Tensor.cpu() to copy the tensor to host memory first. (strict virtual-device "
                        f"mode; tensor {_describe(args[0])})")
    return torch.Tensor.numpy(*args, **kwargs)


_FUNCTION_MODE: list[StrictFunctionMode] = []

_SPECIAL = {
    torch.Tensor.to: _to,
    torch.Tensor.cuda: _cuda,
    torch.Tensor.cpu: _cpu,
    torch.Tensor.pin_memory: _pin_memory,
    torch.Tensor.is_pinned: _is_pinned,
    torch.Tensor.device.__get__: _device_get,
    # getset descriptors at runtime; torch's stubs declare them as plain bool attributes
    torch.Tensor.is_cuda.__get__: _is_cuda_get,  # type: ignore[attr-defined]
    torch.Tensor.is_cpu.__get__: _is_cpu_get,  # type: ignore[attr-defined]
    torch.Tensor.get_device: _get_device,
    torch.Tensor.type: _type,
    torch.Tensor.numpy: _numpy,
}


# ---------------------------------------------------------------------------------------------------
# Every aten op: propagate placements, refuse mixes

aten = torch.ops.aten
_CROSS_DEVICE_OK = {
    aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default, aten._to_copy.default,
    aten.set_.source_Storage, aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor,
    aten.set_.default, aten._has_compatible_shallow_copy_type.default, aten.is_pinned.default,
    aten._pin_memory.default, aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.detach.default,
    aten.alias.default, aten.is_same_size.default,
}
_INDEXING = {aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default, aten._unsafe_index_put.default}
_WHERE = {aten.where.self, aten.where.self_out}
_EXEMPT_COLLECTIVES = {"barrier", "monitored_barrier_"}


def _inputs(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    found: list[tuple[str, torch.Tensor]] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            found.append((str(i), a))
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, torch.Tensor):
                    found.append((f"{i}[{j}]", b))
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            found.append((k, a))
    return found


def _exempt(func: Any, label: str, tensor: torch.Tensor) -> bool:
    """CUDA's own exceptions to "all tensors on one device" (module doc)."""
    if func in _INDEXING and label.startswith("1["):
        return True  # host index tensors may index a device tensor
    if tensor.dim() != 0:
        return False
    if func in _WHERE and label == "0":
        return False  # the condition of where must be on the device
    return torch.Tag.pointwise in func.tags or func in _INDEXING


def _mix_error(func: Any, inputs: list[tuple[str, torch.Tensor, Placement | None]]) -> StrictDeviceError:
    lines = [f"  input {label}: {_describe(t)}" for label, t, _ in inputs]
    return StrictDeviceError(
        f"Expected all tensors to be on the same device, but found at least two devices, "
        f"cuda:{local_device_index()} and cpu! (strict virtual-device mode: {func} would fail on a GPU)\n"
        + "\n".join(lines))


def _collective_error(func: Any, group_name: str, tensor: torch.Tensor) -> StrictDeviceError:
    return StrictDeviceError(
        f"{func} over process group {group_name!r} (NCCL on a GPU machine) got a host tensor "
        f"{_describe(tensor)}: NCCL only takes CUDA tensors; move it to torch.cuda.current_device() "
        "first (strict virtual-device mode)")


def _check_collective(func: Any, args: tuple, kwargs: dict, tensors: list[tuple[str, torch.Tensor]]) -> None:
    if func._opname in _EXEMPT_COLLECTIVES or getattr(_OBJECT_COLLECTIVE, "depth", 0) > 0:
        return
    group = next((a for a in args if isinstance(a, torch.ScriptObject)), None)
    if group is None:
        return
    try:
        name = dist.ProcessGroup.unbox(group).group_name
    except (RuntimeError, AttributeError):
        return
    if name in _HOST_GROUPS:
        return
    for _, t in tensors:
        p = _TABLE.get(t)
        if p is not None and p.kind == HOST:
            raise _collective_error(func, name, t)


class StrictDispatchMode(TorchDispatchMode):
    """Propagates placements through every aten op and refuses host/device mixes (module doc)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = _inputs(args, kwargs)
        if func.namespace == "c10d":
            _check_collective(func, args, kwargs, tensors)
            return func(*args, **kwargs)
        origin: Placement | None = None
        if func not in _CROSS_DEVICE_OK and tensors:
            seen = []
            kinds = set()
            for label, t in tensors:
                p = _TABLE.get(t)
                seen.append((label, t, p))
                if p is None or _exempt(func, label, t) and p.kind == HOST:
                    continue
                kinds.add(p.kind)
                if origin is None or p.kind == DEVICE and origin.kind == HOST:
                    origin = p
            if len(kinds) > 1:
                raise _mix_error(func, seen)
        elif tensors:
            p = _TABLE.get(tensors[0][1])
            origin = p
        out = func(*args, **kwargs)
        factory = getattr(_STATE, "factory", None)
        result = factory if factory is not None else origin
        if result is None or func is aten.detach.default or func is aten.alias.default:
            return out
        _place_outputs(out, result if factory is not None else _derived(result))
        return out


def _place_outputs(out: Any, result: Placement) -> None:
    if isinstance(out, torch.Tensor):
        if _TABLE.get(out) is None:
            _TABLE.set(out, result)
    elif isinstance(out, (list, tuple)):
        for item in out:
            if isinstance(item, torch.Tensor) and _TABLE.get(item) is None:
                _TABLE.set(item, result)


# ---------------------------------------------------------------------------------------------------
# Installation


def _wrap_new_group(original):
    def new_group(*args, **kwargs):
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        group = original(*args, **kwargs)
        if isinstance(backend, str) and backend.lower() == "gloo" and group is not None and \
                group is not dist.GroupMember.NON_GROUP_MEMBER:
            _HOST_GROUPS.add(group.group_name)
        return group

    new_group.__wrapped__ = original
    return new_group


def _wrap_object_collective(original):
    def collective(*args, **kwargs):
        _OBJECT_COLLECTIVE.depth = getattr(_OBJECT_COLLECTIVE, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _OBJECT_COLLECTIVE.depth -= 1

    collective.__wrapped__ = original
    return collective


_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                       "send_object_list", "recv_object_list")


def _patch_distributed() -> None:
    from torch.distributed import distributed_c10d as c10d

    for module in (dist, c10d):
        # monkeypatching torch.distributed and its c10d module (a plain ModuleType to mypy: no attributes to set)
        module.new_group = _wrap_new_group(  # type: ignore[attr-defined]
            c10d.new_group if module is dist else module.new_group)
        for name in _OBJECT_COLLECTIVES:
            if hasattr(module, name):
                setattr(module, name, _wrap_object_collective(getattr(module, name)))


def _patch_cuda() -> None:
    """The torch.cuda calls that GPU code paths make, answered as one idle GPU would."""
    torch.cuda.current_device = local_device_index
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None


def _patch_custom_backward() -> None:
    """Run the Python backward of custom autograd Functions with the function mode on: the autograd
    engine runs them with an empty mode stack, so their factories and moves would go unplaced."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        if torch._C._is_torch_function_mode_enabled():
            return original(self, *args)
        with _FUNCTION_MODE[0]:
            return original(self, *args)

    apply.__wrapped__ = original  # type: ignore[attr-defined]  # a function attribute, as functools.wraps sets
    BackwardCFunction.apply = apply  # type: ignore[method-assign]  # monkeypatching torch's autograd engine hook


def install() -> bool:
    """Enter both modes on this thread (once). The caller (cpu_compat) checks that CUDA is absent."""
    global _ACTIVE
    if _ACTIVE:
        return True
    _patch_cuda()
    _patch_distributed()
    _patch_custom_backward()
    _FUNCTION_MODE.append(StrictFunctionMode())
    _FUNCTION_MODE[0].__enter__()
    StrictDispatchMode().__enter__()
    _ACTIVE = True
    return True


def requested() -> bool:
    """Whether the environment asks for the mode (LITEPPO_STRICT_DEVICE=1)."""
    return os.environ.get("LITEPPO_STRICT_DEVICE", "").strip().lower() in ("1", "true", "yes", "on")
