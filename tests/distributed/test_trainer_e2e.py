"""The trainer end to end under torchrun with 2 CPU processes: outputs, checkpoints, resume (same
layout: the same metrics as an uninterrupted run; another layout: training continues)."""

import json
import math
import os

import pytest

from tests.launch_utils import run_entry

CONFIG = "examples/tiny_cpu.yaml"
FAST = ["logging.log_interval=1", "eval.max_prompts=40", "eval.interval=0"]


def _run(run_dir, *overrides, nproc=2, timeout=300):
    proc = run_entry(["--config", CONFIG, f"output_dir={run_dir}", *FAST, *overrides], nproc=nproc, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full"))
    proc = _run(run_dir, "max_steps=6", "checkpoint.save_interval=3")
    return run_dir, proc


def test_a_short_run_writes_every_output(uninterrupted):
    run_dir, proc = uninterrupted
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    for row in rows[1:]:
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "response_length/mean",
                    "rollout/logprob_abs_diff", "time/rollout", "time/train", "perf/step_s"):
            assert key in row and row[key] is not None and math.isfinite(row[key]), (row["step"], key)
        assert row["actor/skipped_updates"] == 0
        assert row["rollout/logprob_abs_diff"] < 1e-4  # the engine generates with the trainer's weights
    assert len({r["actor/entropy"] for r in rows[1:]}) > 1  # the policy changes
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and "reward" in lines[0] and "s/step" in lines[0] and "eta" in lines[0]
    assert "eval at step 0 | accuracy " in proc.stdout  # the evaluation before training
    assert "liteppo: done: 6 steps in " in proc.stdout and "eval/accuracy " in proc.stdout  # the summary
    assert f"python tools/convert_mcore_to_hf.py --ckpt {run_dir}/checkpoints/iter_0000006" in proc.stdout
    for name in ("config.yaml", "samples.jsonl", "reward_accuracy.png", "tensorboard"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["iter_0000003", "iter_0000006", "latest"]
    assert open(os.path.join(ckpts, "latest")).read().strip() == "iter_0000006"


def test_resume_gives_the_metrics_of_an_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = str(tmp_path / "resumed")
    _run(run_dir, "max_steps=3", "checkpoint.save_interval=3")  # "interrupted" after the step-3 checkpoint
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["iter_0000003", "latest"]
    # what a process killed while saving step 6 leaves behind: a partial folder, `latest` untouched
    partial = os.path.join(run_dir, "checkpoints", "iter_0000006.partial")
    os.makedirs(partial)
    open(os.path.join(partial, "__0_0.distcp"), "wb").write(b"truncated")
    proc = _run(run_dir, "max_steps=6", "checkpoint.save_interval=3")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["iter_0000003", "iter_0000006", "latest"]
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    want = {r["step"]: _comparable(r) for r in _metrics(full_dir)}
    got = [r for r in _metrics(run_dir) if r["step"] > 3]
    assert [r["step"] for r in got] == [4, 5, 6]
    for row in got:
        expected = want[row["step"]]
        assert _comparable(row).keys() == expected.keys()
        for key, value in _comparable(row).items():
            assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (row["step"], key)


def test_resume_at_another_layout_keeps_training(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    run_dir = str(tmp_path / "relayout")
    os.makedirs(run_dir)
    proc = _run(run_dir, "max_steps=5", "parallel.tp=2", f"checkpoint.load={full_dir}/checkpoints/iter_0000003")
    assert "at step 3" in proc.stdout
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows if r["step"] > 0] == [4, 5]
    assert all(r["rollout/logprob_abs_diff"] < 1e-4 for r in rows if r["step"] > 0)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from liteppo_mcore.parallel.setup import free_port
    from tests.launch_utils import ENTRY, REPO

    run_dir = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), ENTRY, "--config", CONFIG, f"output_dir={run_dir}", *FAST,
           "max_steps=100000", "checkpoint.save_interval=0", "eval.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    last = _metrics(run_dir)[-1]["step"]
    assert "stopped by a signal" in out and "checkpoint saved" in out, out[-3000:]
    # torchrun itself reports the signal it got with a traceback of its own; our processes print none
    assert 'liteppo_mcore/' not in out and 'pretrain_liteppo.py", line' not in out, out[-3000:]
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert latest == f"iter_{last:07d}"


def test_fast_engine_trains_with_the_weight_sync(tmp_path):
    _run(str(tmp_path), "max_steps=2", "rollout.engine=fast", "eval.enabled=false", "checkpoint.save_interval=0")
    rows = [r for r in _metrics(str(tmp_path)) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_abs_diff"] < 1e-4 for r in rows)  # engine and trainer agree after a sync
