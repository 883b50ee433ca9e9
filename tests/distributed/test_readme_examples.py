"""The code README.md shows runs: its Python block under "Models and parallel layouts" is
examples/models_forward.py word for word, and that script runs under torchrun (TP=2, 2 CPU processes)."""

import os
import subprocess
import sys

from liteppo_mcore.parallel.setup import free_port
from tests.launch_utils import REPO

SCRIPT = os.path.join(REPO, "examples", "models_forward.py")


def _readme_block(after: str) -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start:text.index("```\n", start)]


def test_the_readme_shows_the_script():
    body = open(SCRIPT, encoding="utf-8").read().split('"""', 2)[2].lstrip("\n")
    assert _readme_block("## Models and parallel layouts") == body


def test_the_script_runs():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), SCRIPT]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logp (4, 6), entropy (4, 6), values (4, 6)" in proc.stdout
