"""What clusters do to a run, done to the embedded default under torchrun (2 CPU processes): two runs
on one directory, retention, a re-save over an existing step, a kill after a step was logged, damaged
checkpoints, a full disk. Each asserts the exit status, the message, and that no completed step is
lost or logged twice. (The hung rank, the circuit breaker and signals mid-step have their own files.)"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from liteppo_mcore.parallel.setup import free_port
from tests.launch_utils import ENTRY, REPO, run_entry

CONFIG = "examples/tiny_cpu.yaml"
FAST = ["logging.log_interval=1", "eval.max_prompts=16", "eval.interval=0", "logging.plot=false"]


def _run(run_dir, *overrides, expect=0, env=None, timeout=300):
    proc = run_entry(["--config", CONFIG, f"output_dir={run_dir}", *FAST, *overrides], nproc=2, timeout=timeout,
                     env=env)
    if expect == 0:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    else:  # torchrun exits 1 when a process fails and reports each process's own status
        assert proc.returncode != 0 and f"exitcode  : {expect} " in proc.stderr, (proc.stdout[-3000:]
                                                                                 + proc.stderr[-5000:])
    return proc


def _rows(run_dir, name="metrics.jsonl"):
    with open(os.path.join(run_dir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def _assert_same_rows(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert _comparable(a).keys() == _comparable(b).keys()
        for key, value in _comparable(a).items():
            assert value == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


def _ckpts(run_dir):
    return os.path.join(run_dir, "checkpoints")


def _latest(run_dir):
    return open(os.path.join(_ckpts(run_dir), "latest")).read().strip()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    run_dir = str(tmp_path_factory.mktemp("base") / "run")
    _run(run_dir, "max_steps=4", "checkpoint.save_interval=2")
    assert sorted(os.listdir(_ckpts(run_dir))) == ["iter_0000002", "iter_0000004", "latest"]
    return run_dir


def test_a_checkpoint_carries_the_runs_tokenizer(base):
    from transformers import AutoTokenizer

    from liteppo_mcore.data import build_builtin_tokenizer

    hf = os.path.join(_ckpts(base), "iter_0000004", "hf")
    saved, builtin = AutoTokenizer.from_pretrained(hf, local_files_only=True), build_builtin_tokenizer()
    assert saved("max:907")["input_ids"] == builtin("max:907")["input_ids"]
    assert saved.chat_template == builtin.chat_template and saved.eos_token == builtin.eos_token
    listed = json.load(open(os.path.join(_ckpts(base), "iter_0000004", "checksums.json")))["files"]
    assert "hf/tokenizer.json" in listed  # part of the verified checkpoint


def _copy(base, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    return run_dir


def test_two_runs_on_one_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), ENTRY, "--config", CONFIG, f"output_dir={run_dir}", *FAST,
           "max_steps=100000", "checkpoint.save_interval=0", "eval.enabled=false"]
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not os.path.exists(metrics) or len(_rows(run_dir)) < 2):
            assert first.poll() is None, first.communicate()[0][-3000:]
            time.sleep(0.5)
        holder = json.load(open(os.path.join(run_dir, "run.lock")))
        second = _run(run_dir, "max_steps=3", expect=2)
        assert "is in use by another run" in second.stderr, second.stderr[-3000:]
        assert f"PID {holder['pid']}" in second.stderr and holder["host"] in second.stderr
        assert "liteppo_mcore/" not in second.stderr  # no traceback of ours (torchrun prints its own)
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert "stopped by a signal" in out, out[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "run.lock"))  # released on the way out
    done = int(_latest(run_dir)[len("iter_"):])
    proc = _run(run_dir, f"max_steps={done + 1}", "eval.enabled=false")  # the directory is free again
    assert f"at step {done}" in proc.stdout
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps == list(range(1, done + 2)), steps  # every step once: nothing the second start did stayed


def test_a_stale_lock_of_a_killed_run_is_taken_over(base, tmp_path):
    run_dir = _copy(base, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    with open(os.path.join(run_dir, "run.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "pid_start": "1", "started": "before"}, f)
    proc = _run(run_dir, "max_steps=5", "checkpoint.save_interval=5")
    assert "took over the lock" in proc.stderr and "is gone" in proc.stderr
    assert [r["step"] for r in _rows(run_dir)] == [0, 1, 2, 3, 4, 5]


def test_retention_keeps_the_newest(tmp_path):
    run_dir = str(tmp_path / "run")
    _run(run_dir, "max_steps=4", "checkpoint.save_interval=1", "checkpoint.num_to_keep=2", "eval.enabled=false",
         "logging.log_interval=3")
    assert sorted(os.listdir(_ckpts(run_dir))) == ["iter_0000003", "iter_0000004", "latest"]
    # samples every logging step and at the last one, labelled with the step as in metrics.jsonl
    assert [r["step"] for r in _rows(run_dir, "samples.jsonl")] == [3, 3, 4, 4]
    proc = _run(run_dir, "max_steps=6", "checkpoint.save_interval=1", "checkpoint.num_to_keep=2",
                "eval.enabled=false")
    assert "at step 4" in proc.stdout
    assert sorted(os.listdir(_ckpts(run_dir))) == ["iter_0000005", "iter_0000006", "latest"]
    # the console names the configuration's file instead of printing it
    assert f"resolved configuration in {run_dir}/config.yaml" in proc.stdout
    assert "rollout_batch_size:" not in proc.stdout


def test_resaving_an_existing_step_never_leaves_latest_dangling(base, tmp_path):
    run_dir = _copy(base, tmp_path)
    ckpts = _ckpts(run_dir)
    old = os.path.join(ckpts, "iter_0000004")
    # What a kill between the two renames of a re-save of step 4 leaves: the old copy set aside, the
    # new one complete under its temporary name, `latest` naming iter_0000004.
    shutil.copytree(old, old + ".partial")
    os.rename(old, old + ".replaced")
    proc = _run(run_dir, "max_steps=4")
    assert "restored the previous copy" in proc.stderr
    assert "already complete at step 4" in proc.stdout and "raise max_steps" in proc.stdout  # nothing left to do
    # A real re-save: resume from step 2 and save step 4 over the existing folder.
    before = json.load(open(os.path.join(old, "checksums.json")))["saved_at"]
    proc = _run(run_dir, "max_steps=4", "checkpoint.save_interval=2", f"checkpoint.load={ckpts}/iter_0000002")
    assert "at step 2" in proc.stdout
    assert sorted(os.listdir(ckpts)) == ["iter_0000002", "iter_0000004", "latest"]
    assert json.load(open(os.path.join(old, "checksums.json")))["saved_at"] > before
    _assert_same_rows(_rows(run_dir), _rows(base))  # steps 3 and 4 ran again, logged once, same numbers


def test_a_kill_after_logging_drops_the_rows_that_run_again(base, tmp_path):
    run_dir = _copy(base, tmp_path)
    # Killed after step 4 was logged but before its checkpoint became final: latest names step 2.
    shutil.rmtree(os.path.join(_ckpts(run_dir), "iter_0000004"))
    with open(os.path.join(_ckpts(run_dir), "latest"), "w") as f:
        f.write("iter_0000002\n")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "reward/me')  # and a line cut short
    _run(run_dir, "max_steps=4", "checkpoint.save_interval=2")
    _assert_same_rows(_rows(run_dir), _rows(base))
    samples = [r["step"] for r in _rows(run_dir, "samples.jsonl")]
    assert samples == [r["step"] for r in _rows(base, "samples.jsonl")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]


def _flip_a_bit(path, offset=None):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])


@pytest.mark.parametrize("damage, verify, message", [
    ("truncate_shard", True, "were written (truncated or overwritten)"),
    ("flip_shard", True, "does not match its checksum"),
    ("truncate_common", False, "could not be read"),
])
def test_a_damaged_latest_falls_back_to_the_newest_intact(base, tmp_path, damage, verify, message):
    run_dir = _copy(base, tmp_path)
    folder = os.path.join(_ckpts(run_dir), "iter_0000004")
    target = os.path.join(folder, "common.pt" if damage.endswith("common") else "__0_0.distcp")
    (_truncate if damage.startswith("truncate") else _flip_a_bit)(target)
    proc = _run(run_dir, "max_steps=4", "checkpoint.save_interval=2", f"checkpoint.verify={str(verify).lower()}")
    assert f"skipping {folder}" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "iter_0000002 at step 2" in proc.stdout
    _assert_same_rows(_rows(run_dir), _rows(base))  # steps 3 and 4 again, exactly
    assert _latest(run_dir) == "iter_0000004"


@pytest.mark.parametrize("damage, message", [("flip", "does not match its checksum"), ("delete", "is missing")])
def test_a_damaged_explicit_checkpoint_is_an_error_naming_the_file(base, tmp_path, damage, message):
    run_dir = _copy(base, tmp_path)
    folder = os.path.join(_ckpts(run_dir), "iter_0000004")
    shard = os.path.join(folder, "__0_1.distcp")
    _flip_a_bit(shard) if damage == "flip" else os.remove(shard)
    proc = _run(str(tmp_path / "new"), "max_steps=5", f"checkpoint.load={folder}", expect=2)
    assert f"{shard} {message}" in proc.stderr and "checkpoint.load" in proc.stderr, proc.stderr[-3000:]
    assert "liteppo_mcore/" not in proc.stderr  # no traceback of ours (torchrun prints its own)


def _mount_tmpfs(where, size):
    os.makedirs(where, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                          capture_output=True).returncode == 0


# A writer that finds the disk full from the second checkpoint on (also where no small filesystem
# can be mounted): torch.save of the RNG file, a real part of every save, raises ENOSPC.
_FULL_DISK_PATCH = """
import errno, torch
_save = torch.save
def _full(obj, f, *a, **k):
    if isinstance(f, str) and "/rng/" in f and "iter_0000001" not in f:
        raise OSError(errno.ENOSPC, "No space left on device", f)
    return _save(obj, f, *a, **k)
torch.save = _full
"""


@pytest.mark.parametrize("disk", ["small_tmpfs", "patched_writer"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, disk):
    mount = tempfile.mkdtemp(prefix="liteppo-small-disk-")
    small = disk == "small_tmpfs"
    env = None
    if small and not _mount_tmpfs(mount, "3m"):
        shutil.rmtree(mount, ignore_errors=True)
        pytest.skip("this machine does not allow mounting a tmpfs (the patched_writer case covers the handling)")
    if not small:
        patch_dir = tmp_path / "patch"
        patch_dir.mkdir()
        (patch_dir / "sitecustomize.py").write_text(_FULL_DISK_PATCH)
        env = {"PYTHONPATH": f"{patch_dir}:{os.environ.get('PYTHONPATH', '')}"}
    run_dir = os.path.join(mount, "run")
    try:
        proc = _run(run_dir, "max_steps=6", "checkpoint.save_interval=1", "eval.enabled=false",
                    "logging.tensorboard=false", "logging.num_sample_completions=0", expect=2, env=env)
        assert "no space left on device while writing" in proc.stderr and "bytes free" in proc.stderr, \
            proc.stderr[-3000:]
        assert "iter_0000001 stays the latest checkpoint" in proc.stderr
        if small:
            assert "this save may fail" in proc.stderr  # the early warning: less free than the last one took
        assert sorted(os.listdir(_ckpts(run_dir))) == ["iter_0000001", "latest"]  # no partial folder left
        assert _latest(run_dir) == "iter_0000001"
        assert [r["step"] for r in _rows(run_dir)] == [1]  # step 2 was not kept: it runs again on resume
        assert not os.path.exists(os.path.join(run_dir, "run.lock"))
    finally:
        if small:
            subprocess.run(["umount", mount], check=False)
        shutil.rmtree(mount, ignore_errors=True)
