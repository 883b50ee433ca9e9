"""The one answer to "would this run on a GPU?", and the devices that follow from it.

Every placement decision of the package asks here instead of `torch.cuda.is_available()`: megatron's
`use_cpu_initialization`, the compute device of models and engines, offload to pinned host memory,
the device of tensors sent over collectives. Under the strict virtual-device mode (`strict_device`,
`LITEPPO_STRICT_DEVICE=1`) the answer is yes on a machine without CUDA, so the code paths the CPU
suite runs are the GPU ones. Numerics (dtype choices, CUDA graphs, kernels) ask
`torch.cuda.is_available()` directly: they must stay as configured on the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def on_gpu() -> bool:
    """Whether tensors are placed as on a GPU machine: CUDA present, or the strict mode on."""
    if torch.cuda.is_available():
        return True
    from liteppo_mcore.parallel import strict_device

    if strict_device.requested() and not strict_device.is_active():
        from liteppo_mcore.parallel import cpu_compat

        cpu_compat.install(strict=True)
    return strict_device.is_active()


def compute_device() -> torch.device:
    """The device models, batches and engines live on: this process's GPU, else the CPU."""
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: itself when that is the host (no copy, and no call through torch, which
    costs more than the small index tensors it would move), else an asynchronous copy."""
    return x if device.type == "cpu" else x.to(device, non_blocking=True)


def is_host_group(group: dist.ProcessGroup | None) -> bool:
    """Whether collectives over `group` take host tensors (gloo) rather than CUDA ones (NCCL)."""
    if torch.cuda.is_available():
        return dist.get_backend(group) != "nccl"
    from liteppo_mcore.parallel import strict_device

    if strict_device.is_active():
        return strict_device.is_host_group(group)
    return True


def collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """The device a tensor must be on to be sent over `group`."""
    return torch.device("cpu") if is_host_group(group) else compute_device()


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator for sampling on `device`. Under the strict mode the data of a "device" tensor
    is on the CPU, so its generator is a CPU one (torch cannot make a CUDA generator without CUDA)."""
    physical = device if torch.cuda.is_available() or device.type != "cuda" else torch.device("cpu")
    return torch.Generator(device=physical).manual_seed(int(seed))
