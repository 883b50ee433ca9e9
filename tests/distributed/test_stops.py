"""How a run stops, under torchrun (2 CPU processes): a SIGTERM in the middle of a step longer than
torchrun's 30 s shutdown window, a burst of signals, and the circuit breaker on a reward function that
always fails (exit 3)."""

import json
import os
import signal
import subprocess
import sys
import time

from liteppo_mcore.parallel.setup import free_port
from tests.launch_utils import ENTRY, REPO, run_entry

CONFIG = "examples/tiny_cpu.yaml"
FAST = ["logging.log_interval=1", "eval.enabled=false", "logging.plot=false", "reward.num_workers=1"]

REWARDS = '''
import os
import time

from liteppo_mcore.rewards import get_reward

_max_digit = get_reward("max_digit")


def slow_when_asked(response, answer):
    """max_digit's score; while the marker file exists each call first sleeps a minute."""
    marker = os.environ["SLOW_REWARD_MARKER"]
    if os.path.exists(marker):
        open(marker + ".started", "w").close()
        time.sleep(60)
    return _max_digit(response, answer)


def broken(response, answer):
    raise ValueError("this reward function always fails")
'''


def _rows(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return str(path)


def _start(run_dir, *overrides, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), ENTRY, "--config", CONFIG, f"output_dir={run_dir}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(predicate, proc, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.2)


def test_one_sigterm_in_a_long_step_saves_within_torchruns_shutdown_window(tmp_path):
    run_dir, marker = str(tmp_path / "run"), str(tmp_path / "slow")
    reward = f"reward.name={_rewards_file(tmp_path)}:slow_when_asked"
    env = {"SLOW_REWARD_MARKER": marker}
    proc = _start(run_dir, "max_steps=1000", "checkpoint.save_interval=0", reward, "reward.timeout_s=300", env=env)
    try:
        _wait_for(lambda: len(_rows(run_dir)) >= 1, proc, 240)
        open(marker, "w").close()  # from the next reward phase on, a step takes minutes
        _wait_for(lambda: os.path.exists(marker + ".started"), proc, 60)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler does; it forwards it and waits 30 s
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 30, f"{took:.1f} s: past torchrun's shutdown window the processes are killed\n{out[-3000:]}"
    assert "stopped by a signal before step" in out and "checkpoint saved" in out, out[-3000:]
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps == list(range(1, len(steps) + 1))
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"iter_{steps[-1]:07d}"  # every completed step is in the checkpoint
    os.remove(marker)
    proc = run_entry(["--config", CONFIG, f"output_dir={run_dir}", *FAST, reward, f"max_steps={steps[-1] + 1}"],
                     nproc=2, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"at step {steps[-1]}" in proc.stdout
    assert [r["step"] for r in _rows(run_dir)] == list(range(1, steps[-1] + 2))


def test_a_burst_of_signals_is_one_stop(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = _start(run_dir, "max_steps=1000", "checkpoint.save_interval=0", env={})
    try:
        _wait_for(lambda: len(_rows(run_dir)) >= 2, proc, 240)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        for _ in range(5):  # Ctrl-C hammered on every process, then the scheduler's SIGTERM
            for pid in workers:
                os.kill(pid, signal.SIGINT)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.count("liteppo: stopped by a signal") == 1, out[-3000:]
    assert "KeyboardInterrupt" not in out
    steps = [r["step"] for r in _rows(run_dir)]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"iter_{steps[-1]:07d}"


def test_a_reward_function_that_always_fails_stops_the_run_with_exit_3(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = run_entry(["--config", CONFIG, f"output_dir={run_dir}", *FAST, "max_steps=20",
                      f"reward.name={_rewards_file(tmp_path)}:broken", "train.max_consecutive_bad_steps=3"],
                     nproc=2, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 3 " in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.max_consecutive_bad_steps=3" in proc.stderr and "reward" in proc.stderr
    assert "liteppo_mcore/" not in proc.stderr  # a message, not a traceback
    # megatron's "not installed" fallback warnings are one line of ours, once per job
    assert "Falling back to" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("Transformer Engine and apex not installed: megatron-core uses") == 1, proc.stdout
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]  # the bad steps are logged
    assert all(r["reward/errors"] == 256 for r in _rows(run_dir))
