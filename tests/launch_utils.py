"""Running the entry point as a user would: plain python or torchrun, with a hard time limit."""

import os
import subprocess
import sys

from liteppo_mcore.parallel.setup import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(REPO, "launch", "pretrain_liteppo.py")


def run_entry(args, nproc=None, timeout=120, env=None):
    """Run launch/pretrain_liteppo.py with `args`; under torchrun when `nproc` is given."""
    if nproc is None:
        cmd = [sys.executable, ENTRY, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), ENTRY, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if nproc is None:
            full_env.pop(key, None)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
