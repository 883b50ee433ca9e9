"""Test-session set-up: the strict virtual-device mode when the environment asks for it.

`tools/run_tests.sh` and CI run the suite with LITEPPO_STRICT_DEVICE=1: every tensor then carries the
device it would have on a GPU and host/device mixes fail as on CUDA (liteppo_mcore/parallel/
strict_device.py). Processes the tests start (gloo workers, torchrun jobs) inherit the variable and
enter the mode when they build megatron's groups or an engine.
"""

from liteppo_mcore.parallel import strict_device

if strict_device.requested():
    from liteppo_mcore.parallel import cpu_compat

    cpu_compat.install(strict=True)
