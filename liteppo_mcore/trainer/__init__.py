"""The RLVR step loop. Nothing inside the package imports it; the entry point calls `run_training`."""

from __future__ import annotations

import sys


def run_training(cfg, layout) -> int:
    """Run training for `cfg` on this process's `layout`; returns the process exit status."""
    if layout.rank == 0:
        print("liteppo: this version validates configurations and sets up the process groups only; "
              "the training loop is not available yet. Run with --dry-run.", file=sys.stderr, flush=True)
    return 3
