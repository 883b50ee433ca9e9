"""The RLVR step loop (`loop.py`). Nothing inside the package imports it; the entry point calls
`run_training`."""

from __future__ import annotations


def run_training(cfg, layout) -> int:
    """Run training for `cfg` on this process's `layout`; returns the process exit status."""
    from liteppo_mcore.trainer.loop import run_training as run

    return run(cfg, layout)
