"""The file-level parts of checkpointing, in one process: the run-directory lock, checksums, the
interrupted re-save recovery, retention order, disk-full recognition and the metrics log on resume."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from liteppo_mcore.checkpoint import lock as L
from liteppo_mcore.checkpoint import manifest as M
from liteppo_mcore.checkpoint.checkpointer import (
    REPLACED_SUFFIX,
    complete_checkpoints,
    is_disk_full,
    recover_interrupted_replacements,
)
from liteppo_mcore.checkpoint.lock import being_read, reading
from liteppo_mcore.utils.sinks import MetricsWriter, drop_rows_after, read_metrics


# ----------------------------------------------------------------------------------------- lock
def test_a_second_lock_on_a_live_run_is_refused_naming_the_holder(tmp_path):
    first = L.RunDirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(L.RunDirLocked) as err:
            L.RunDirLock(str(tmp_path)).acquire()
        message = str(err.value)
        assert f"PID {os.getpid()}" in message and socket.gethostname() in message and "run.lock" in message
        assert "output_dir" in message
    finally:
        first.release()
    assert not os.path.exists(tmp_path / "run.lock")
    L.RunDirLock(str(tmp_path)).acquire().release()  # free again


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "pid_start": "1",
                                                   "started": "then"}))
    lock = L.RunDirLock(str(tmp_path)).acquire()
    try:
        assert lock.took_over and "gone" in lock.took_over
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # our own PID, but with another start time: the process that took the lock is gone
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "pid_start": "12345", "started": "then"}))
    lock = L.RunDirLock(str(tmp_path)).acquire()
    assert lock.took_over
    lock.release()


def test_another_hosts_lock_is_live_until_it_goes_unrenewed(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "elsewhere-node", "pid": 1, "started": "then", "slurm_job": "77"}))
    with pytest.raises(L.RunDirLocked, match="elsewhere-node.*SLURM job 77"):
        L.RunDirLock(str(tmp_path)).acquire()
    old = time.time() - L.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = L.RunDirLock(str(tmp_path)).acquire()
    assert "not renewed" in lock.took_over
    lock.release()


def test_release_leaves_someone_elses_lock_alone(tmp_path):
    lock = L.RunDirLock(str(tmp_path)).acquire()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "other", "pid": 2}))  # replaced by force
    lock.release()
    assert (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------------------- checksums
def _folder(tmp_path):
    folder = tmp_path / "iter_0000001"
    (folder / "rng").mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(os.urandom(5000))
    (folder / "metadata.json").write_text("{}")
    (folder / "rng" / "rank_0.pt").write_bytes(b"rng")
    return folder


def test_checksums_find_truncation_bit_flips_and_missing_files(tmp_path):
    folder = _folder(tmp_path)
    written = M.write_manifest(str(folder), {"step": 1})
    assert sorted(written["files"]) == ["__0_0.distcp", "metadata.json", "rng/rank_0.pt"]
    assert M.verify(str(folder))[0] == []
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 0x10
    shard.write_bytes(bytes(data))
    problems, _ = M.verify(str(folder))
    assert len(problems) == 1 and "__0_0.distcp does not match its checksum" in problems[0]
    shard.write_bytes(bytes(data[:100]))
    assert "has 100 bytes, 5000 were written" in M.verify(str(folder))[0][0]
    shard.unlink()
    assert "__0_0.distcp is missing" in M.verify(str(folder))[0][0]
    (folder / M.MANIFEST).write_text("{not json")
    assert "unreadable" in M.verify(str(folder))[0][0]
    (folder / M.MANIFEST).unlink()
    assert M.verify(str(folder)) == (None, None)  # an older checkpoint: nothing to check against


def test_read_markers_are_not_part_of_the_checkpoint(tmp_path):
    folder = _folder(tmp_path)
    M.write_manifest(str(folder))
    with reading(str(folder)):
        assert being_read(str(folder))
        assert M.verify(str(folder))[0] == []
    assert not being_read(str(folder))


# ----------------------------------------------------------------------------------------- folders
def test_an_interrupted_resave_gets_its_old_copy_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ("iter_0000004" + REPLACED_SUFFIX)).mkdir(parents=True)
    (ckpts / ("iter_0000004" + REPLACED_SUFFIX) / "metadata.json").write_text("{}")
    (ckpts / "iter_0000006").mkdir()
    (ckpts / ("iter_0000006" + REPLACED_SUFFIX)).mkdir()  # replacement complete: the old copy goes
    assert recover_interrupted_replacements(str(ckpts)) == [str(ckpts / "iter_0000004")]
    assert sorted(os.listdir(ckpts)) == ["iter_0000004", "iter_0000006"]
    assert complete_checkpoints(str(ckpts)) == [str(ckpts / "iter_0000004")]  # 6 has no metadata.json


def test_disk_full_is_recognised_through_wrappers():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)

    class CheckpointException(Exception):  # torch.distributed.checkpoint's: failures by rank
        failures = {1: OSError(errno.ENOSPC, "full")}

    assert is_disk_full(CheckpointException("rank 1 failed"))
    assert not is_disk_full(ValueError("bad shape"))


# ----------------------------------------------------------------------------------------- metrics log
def test_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in [0, 1, 2, 3, 4]) + '{"step": 5, "x"')
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in [1, 3, 4]))
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=2)
    writer.write(3, {"x": 30.0})
    writer.close()
    assert [(r["step"], r["x"]) for r in read_metrics(str(path))] == [(0, 0), (1, 1), (2, 2), (3, 30.0)]
    assert [r["step"] for r in read_metrics(str(tmp_path / "samples.jsonl"))] == [1]
    # a fresh start (no checkpoint to continue from) drops everything an earlier attempt wrote
    MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=None).close()
    assert read_metrics(str(path)) == []
    assert drop_rows_after(str(tmp_path / "absent.jsonl"), 0) == 0


def test_tensorboard_hides_the_steps_that_run_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True)
    for step in range(1, 6):
        first.write(step, {"reward/mean": float(step)})
    first.close()
    time.sleep(1.1)  # event file names carry the second they were created in
    resumed = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True, resume_step=3)
    for step in (4, 5):
        resumed.write(step, {"reward/mean": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
