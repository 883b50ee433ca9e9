"""A rank that stops (SIGSTOP) in the middle of a 2-process run under torchrun: the other rank's next
collective fails after `parallel.timeout_minutes` (here 15 s, not megatron's or torch's 30 minutes),
it says which collective, where, in which stage, and what to do, and the whole job ends non-zero.

torchrun then asks the stopped rank to exit with SIGTERM, which a stopped process cannot act on, and
sends SIGKILL 30 s later (its fixed grace on a worker failure): the job ends about 15 + 30 s after the
stop, the rank's message comes at 15 s.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from liteppo_mcore.parallel.setup import free_port
from tests.launch_utils import ENTRY, REPO

TIMEOUT_S = 15
STAGES = ("rollout", "reward", "normalization", "advantages", "ref", "old_logp", "values", "train", "sync", "eval",
          "checkpoint", "metrics", "signal_check", "setup")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "barrier", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "send", "recv")


def _rows(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def _children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def _ranks(torchrun_pid):
    return {r: pid for pid in _children(torchrun_pid) if (r := _rank_of(pid)) is not None}


class _Reader(threading.Thread):
    """Collects a pipe's lines with the time each arrived."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self):
        for line in self.stream:
            self.lines.append((time.monotonic(), line))

    def text(self):
        return "".join(line for _, line in self.lines)

    def first(self, marker):
        return next((t for t, line in self.lines if marker in line), None)


def test_a_stopped_rank_ends_the_job_after_the_timeout_with_a_message(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), ENTRY, "--config", "examples/tiny_cpu.yaml", f"output_dir={run_dir}",
           "max_steps=200", "eval.max_prompts=8", "eval.interval=0", "checkpoint.save_interval=0",
           f"parallel.timeout_minutes={TIMEOUT_S / 60:g}", "logging.log_interval=1", "logging.plot=false",
           "logging.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    out, err = _Reader(job.stdout), _Reader(job.stderr)
    out.start(), err.start()
    ranks = {}
    try:
        deadline = time.monotonic() + 90
        while len(_rows(os.path.join(run_dir, "metrics.jsonl"))) < 2:  # the eval at step 0, then step 1
            assert job.poll() is None, f"the job ended early ({job.returncode}):\n{err.text()[-3000:]}"
            assert time.monotonic() < deadline, "no step within 90 s"
            time.sleep(0.05)
        ranks = _ranks(job.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            rc = job.wait(timeout=TIMEOUT_S + 45)
        except subprocess.TimeoutExpired:
            rc = None
        ended = time.monotonic() - stopped
        out.join(5), err.join(5)
        log = out.text() + err.text()
        assert rc is not None, f"the job still runs {ended:.0f} s after rank 1 stopped:\n{log[-4000:]}"
        assert rc != 0
        said = err.first("liteppo: rank 0:")
        assert said is not None, log[-4000:]
        assert TIMEOUT_S - 1 < said - stopped < TIMEOUT_S + 10, said - stopped  # the configured limit, applied
        message = [line for _, line in err.lines if line.startswith("liteppo: rank 0:")][0]
        assert any(f" {name} timed out after 15 s " in message for name in COLLECTIVES), message
        assert any(f"stage {name}" in message for name in STAGES), message
        assert "called at liteppo_mcore/" in message, message
        assert "parallel.timeout_minutes=0.25" in err.text()
        assert not [line for _, line in err.lines if 'File "' in line and "liteppo_mcore" in line]  # no traceback
        assert re.search(r"exitcode\s*:\s*4\b", err.text()), err.text()[-3000:]  # hang.EXIT_PEER_FAILURE
        sigterm = err.first("closing signal SIGTERM")
        print(f"rank 0 reported after {said - stopped:.1f} s, torchrun stopped the workers after "
              f"{(sigterm or float('nan')) - stopped:.1f} s, the job ended after {ended:.1f} s: {message.strip()}")
    finally:
        for pid in ranks.values():
            try:
                os.killpg(pid, signal.SIGKILL)  # each rank leads its own session under torchrun
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.wait(timeout=10)
