"""The reward runner: worker processes, a per-sample time limit that kills the computation, failure
kinds and counts, declared ranges, and no process left behind."""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from liteppo_mcore.rewards import (
    ERRORS_METRIC,
    TIMEOUTS_METRIC,
    RewardRunner,
    RewardWorkerError,
    answer_match_reward,
    build_reward_runner,
    registry,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPTED = '''
import os, sys, time

def scripted(response, answer):
    """A reward whose behaviour the response text chooses; declares the range [0, 1]."""
    if response == "raise":
        raise RuntimeError("scripted failure")
    if response.startswith("sleep "):
        time.sleep(float(response.split()[1]))
        return 1.0
    if response.startswith("spin "):  # "spin <file>": write the pid there, then burn the CPU for 60 s
        with open(response.split()[1], "w") as f:
            f.write(str(os.getpid()))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pass
        return 1.0
    if response.startswith("child "):  # "child <file>": start a subprocess, write its pid, wait for it
        import subprocess
        child = subprocess.Popen(["sleep", "60"])
        with open(response.split()[1], "w") as f:
            f.write(str(child.pid))
        child.wait()
        return 1.0
    if response == "nan":
        return float("nan")
    if response == "text":
        return "1.0"
    if response == "big":
        return 1.5
    if response == "exit":
        os._exit(3)
    return 1.0 if response == answer else 0.0

scripted.reward_range = (0.0, 1.0)

def unrestricted(response, answer):
    return float(response)

def heavy_modules(response, answer):
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron"))
    if loaded:
        raise RuntimeError("the worker has loaded " + ", ".join(loaded[:5]))
    return 1.0
'''


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "scripted_rewards.py"
    path.write_text(SCRIPTED)
    return str(path)


@pytest.fixture(scope="module")
def scripted(scripted_file):
    return f"{scripted_file}:scripted"


def _exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone(pid):
    """No such process, or a zombie (an orphan is reaped by whoever adopts it, maybe late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _proc_table():
    """{pid: (parent pid, state)} of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants():
    """Every process below this one (the forkserver's children included), zombies included."""
    table = _proc_table()
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


@pytest.fixture(scope="module")
def baseline(scripted):
    """The processes below this one once the forkserver and the resource tracker exist."""
    with RewardRunner.from_name(scripted, timeout_s=5, num_workers=1) as runner:
        runner(["a"], ["a"])
    return descendants()


def new_processes(baseline):
    return descendants() - baseline


# --------------------------------------------------------------------------- scoring and failure kinds
def test_scores_in_order_without_errors(scripted):
    with RewardRunner.from_name(scripted, timeout_s=5, num_workers=3) as runner:
        scores, stats = runner(["a", "b", "c", "d", "e", "sleep 0.05", "g"], ["a", "x", "c", "x", "e", "z", "x"])
        assert all(pid != os.getpid() for pid in runner.worker_pids()) and len(runner.worker_pids()) == 3
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert stats == {ERRORS_METRIC: 0.0, TIMEOUTS_METRIC: 0.0}


def test_an_empty_batch(scripted):
    with RewardRunner.from_name(scripted, timeout_s=5, num_workers=1) as runner:
        assert runner([], []) == ([], {ERRORS_METRIC: 0.0, TIMEOUTS_METRIC: 0.0})


def test_failures_score_zero_and_are_counted_by_kind(scripted):
    with RewardRunner.from_name(scripted, timeout_s=5, num_workers=2) as runner:
        assert runner.reward_range == (0.0, 1.0)
        scores, stats = runner(["a", "raise", "nan", "text", "big", "exit", "b"], ["a"] * 6 + ["b"])
        kinds = [(f.index, f.kind) for f in runner.last_failures]
        messages = [f.message for f in runner.last_failures]
        assert len(runner.worker_pids()) == 2  # the crashed worker was replaced
        assert runner([str(d) for d in range(6)], [str(d) for d in range(6)])[0] == [1.0] * 6
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert stats == {ERRORS_METRIC: 5.0, TIMEOUTS_METRIC: 0.0}
    assert kinds == [(1, "error"), (2, "bad_value"), (3, "bad_value"), (4, "out_of_range"), (5, "crash")]
    assert "RuntimeError: scripted failure" in messages[0]
    assert "nan" in messages[1] and "'1.0'" in messages[2]
    assert "1.5" in messages[3] and "[0, 1]" in messages[3]
    assert "exit code 3" in messages[4]


def test_a_function_without_a_declared_range_is_unrestricted(scripted_file):
    with RewardRunner.from_name(f"{scripted_file}:unrestricted", timeout_s=5, num_workers=1) as runner:
        assert runner.reward_range is None
        scores, stats = runner(["-5", "1e6", "0.25"], ["", "", ""])
    assert scores == [-5.0, 1e6, 0.25] and stats[ERRORS_METRIC] == 0.0


def test_out_of_range_is_logged_naming_the_function_value_and_range(scripted, caplog):
    with caplog.at_level(logging.WARNING, logger="liteppo_mcore.rewards.runner"):
        with RewardRunner.from_name(scripted, timeout_s=5, num_workers=1) as runner:
            runner(["big"], ["ans-big"])
    assert "scripted_rewards.py:scripted" in caplog.text
    assert "out_of_range" in caplog.text and "1.5" in caplog.text and "[0, 1]" in caplog.text
    assert "ans-big" in caplog.text


def test_failures_are_logged_with_the_sample(scripted, caplog):
    with caplog.at_level(logging.WARNING, logger="liteppo_mcore.rewards.runner"):
        with RewardRunner.from_name(scripted, timeout_s=5, num_workers=2, max_logged_failures=2) as runner:
            runner(["raise", "raise", "raise", "ok"], ["ans-0", "ans-1", "ans-2", "ok"])
    text = caplog.text
    assert "sample 0" in text and "ans-0" in text and "scripted failure" in text
    assert "sample 1" in text
    assert "sample 2" not in text  # beyond max_logged_failures: summarized
    assert "1 more failures in this batch (3 in all" in text


# --------------------------------------------------------------------------- time limits and processes
def test_a_timed_out_worker_is_killed_and_the_batch_returns_in_time(scripted, baseline, tmp_path):
    pid_file = tmp_path / "spin.pid"
    with RewardRunner.from_name(scripted, timeout_s=0.5, num_workers=2) as runner:
        before = set(runner.worker_pids())
        start = time.monotonic()
        scores, stats = runner([f"spin {pid_file}", "a", "sleep 0.01", "b"], ["a", "a", "a", "x"])
        elapsed = time.monotonic() - start
        spinner = int(pid_file.read_text())
        assert spinner in before
        assert not _exists(spinner), "the worker that ran past its time limit is still alive"
        assert spinner not in runner.worker_pids() and len(runner.worker_pids()) == 2
        assert new_processes(baseline) == set(runner.worker_pids())
        assert runner.num_killed == 1
    assert scores == [0.0, 1.0, 1.0, 0.0]
    assert stats == {ERRORS_METRIC: 1.0, TIMEOUTS_METRIC: 1.0}
    assert [(f.index, f.kind) for f in runner.last_failures] == [(0, "timeout")]
    assert elapsed < 0.5 + 1.0, f"a batch with one stuck sample took {elapsed:.2f} s (time limit 0.5 s)"


def test_batches_of_stuck_samples_never_grow_the_pool(scripted, baseline, tmp_path):
    # More stuck samples than workers, then ordinary ones: each stuck sample times out on its own
    # clock, its worker is killed and replaced, the rest are scored; batch after batch the live
    # processes stay the pool's.
    spinners = []
    with RewardRunner.from_name(scripted, timeout_s=0.3, num_workers=2) as runner:
        for batch, num_stuck in enumerate([4, 2, 2]):
            files = [tmp_path / f"{batch}-{k}.pid" for k in range(num_stuck)]
            start = time.monotonic()
            scores, stats = runner([f"spin {f}" for f in files] + ["a", "b"], ["a"] * num_stuck + ["a", "x"])
            elapsed = time.monotonic() - start
            assert scores == [0.0] * num_stuck + [1.0, 0.0]
            assert stats == {ERRORS_METRIC: float(num_stuck), TIMEOUTS_METRIC: float(num_stuck)}
            waves = num_stuck // 2  # each wave: the time limit, then fresh workers start (slower on a busy machine)
            assert elapsed < waves * 0.3 + 1.5, (batch, elapsed)
            spinners += [int(f.read_text()) for f in files]
            assert not any(_exists(pid) for pid in spinners)
            live = new_processes(baseline)
            assert live == set(runner.worker_pids()) and len(live) == 2, live
        assert runner.num_killed == 8 and runner.total_timeouts == 8
        assert runner(["a", "b", "c"], ["a", "b", "x"])[0] == [1.0, 1.0, 0.0]


def test_a_timed_out_worker_takes_its_subprocesses_along(scripted, tmp_path):
    pid_file = tmp_path / "child.pid"
    with RewardRunner.from_name(scripted, timeout_s=0.5, num_workers=1) as runner:
        scores, stats = runner([f"child {pid_file}"], ["a"])
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 5  # the orphan is reaped by whoever adopts it
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(child), "a subprocess of the killed worker is still running"
    assert scores == [0.0] and stats[TIMEOUTS_METRIC] == 1.0


def test_each_sample_gets_its_own_time_limit(scripted):
    # Three samples of 0.2 s on one worker take 0.6 s in all: none may time out at a 0.45 s limit,
    # because a sample's clock starts when a worker is handed it, not when the batch starts.
    with RewardRunner.from_name(scripted, timeout_s=0.45, num_workers=1) as runner:
        scores, stats = runner(["sleep 0.2"] * 3, ["a"] * 3)
    assert scores == [1.0] * 3
    assert stats == {ERRORS_METRIC: 0.0, TIMEOUTS_METRIC: 0.0}


def test_close_leaves_no_child_process(scripted, baseline):
    runner = RewardRunner.from_name(scripted, timeout_s=5, num_workers=3)
    runner(["a", "b", "c"], ["a", "b", "c"])
    pids = runner.worker_pids()
    assert len(pids) == 3 and new_processes(baseline) == set(pids)
    runner.close()
    runner.close()  # idempotent
    assert not any(_exists(pid) for pid in pids)
    assert new_processes(baseline) == set()
    with pytest.raises(RuntimeError, match="closed"):
        runner(["a"], ["a"])


def test_a_runner_that_is_dropped_ends_its_workers(scripted, baseline):
    runner = RewardRunner.from_name(scripted, timeout_s=5, num_workers=2)
    runner(["a"], ["a"])
    pids = runner.worker_pids()
    del runner
    assert not any(_exists(pid) for pid in pids)
    assert new_processes(baseline) == set()


_EXIT_SCRIPT = """
import os, sys, threading, time
from liteppo_mcore.rewards import RewardRunner

def main():
    runner = RewardRunner.from_name(sys.argv[1], timeout_s=60, num_workers=2)
    runner(["a"], ["a"])
    print(" ".join(map(str, runner.worker_pids())), flush=True)
    if sys.argv[2] in ("busy", "killed"):  # one worker spinning when the interpreter exits or dies
        threading.Thread(target=runner, args=(["spin " + sys.argv[3]], ["a"]), daemon=True).start()
        while not os.path.exists(sys.argv[3]) or not open(sys.argv[3]).read():
            time.sleep(0.01)
    if sys.argv[2] == "killed":  # the trainer dies without any clean-up
        os.kill(os.getpid(), 9)

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("how", ["idle", "busy", "killed"])
def test_interpreter_exit_ends_the_workers(scripted, tmp_path, how):
    script = tmp_path / "exit_with_runner.py"
    script.write_text(_EXIT_SCRIPT)
    pid_file = tmp_path / "busy.pid"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(script), scripted, how, str(pid_file)], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode == (-9 if how == "killed" else 0), proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    if how != "idle":
        pids.append(int(pid_file.read_text()))
    assert len(pids) >= 2
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids), [pid for pid in pids if not _gone(pid)]


def test_a_worker_does_not_import_torch(scripted_file):
    import torch  # noqa: F401 - loaded here, in the trainer's process; a forked worker would have it too

    with RewardRunner.from_name(f"{scripted_file}:heavy_modules", timeout_s=30, num_workers=1) as runner:
        scores, stats = runner(["x"], ["x"])
    assert stats[ERRORS_METRIC] == 0.0, runner.last_failures
    assert scores == [1.0]


# --------------------------------------------------------------------------- naming the function
def test_module_function_through_the_workers(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_pool.py").write_text(textwrap.dedent("""
        import os
        def exact(response, answer):
            return 1.0 if response.strip() == answer else 0.25
        exact.reward_range = (0.0, 1.0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with RewardRunner.from_name("user_rewards_pool:exact", timeout_s=5, num_workers=2) as runner:
        assert runner.reward_range == (0.0, 1.0)
        scores, stats = runner([" 7", "8", "9 "], ["7", "7", "9"])
    assert scores == [1.0, 0.25, 1.0] and stats[ERRORS_METRIC] == 0.0


def test_relative_file_path_function_through_the_workers(tmp_path, monkeypatch):
    (tmp_path / "by_path.py").write_text("def score(response, answer):\n    return float(len(response))\n")
    monkeypatch.chdir(tmp_path)
    runner = RewardRunner.from_name("by_path.py:score", timeout_s=5, num_workers=1)
    monkeypatch.chdir(REPO)  # the name was made absolute: later workers find the file from anywhere
    with runner:
        assert runner.name == f"{tmp_path / 'by_path.py'}:score"
        assert runner(["abc", "", "hello"], ["", "", ""])[0] == [3.0, 0.0, 5.0]


def test_a_function_registered_at_run_time_reaches_the_workers(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_registered.py").write_text("def half(response, answer):\n    return float(response)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_RANGES", dict(registry._RANGES))
    import user_rewards_registered

    registry.register_reward("half_test", user_rewards_registered.half, range=(0.0, 0.5))
    with RewardRunner.from_name("half_test", timeout_s=5, num_workers=1) as runner:
        scores, stats = runner(["0.5", "0.75", "-1"], ["", "", ""])
    assert scores == [0.5, 0.0, 0.0] and stats[ERRORS_METRIC] == 2.0
    assert [f.kind for f in runner.last_failures] == ["out_of_range", "out_of_range"]


def test_a_plain_module_level_function(baseline):
    with RewardRunner(answer_match_reward, timeout_s=5, num_workers=2) as runner:
        assert runner.reward_range == (0.0, 1.0)
        assert runner.name == "liteppo_mcore.rewards.answer_match:answer_match_reward"
        scores, stats = runner(["7<|end|>", "77", "3", "x"], ["7", "7", "7", "7"])
    assert scores == [1.0, 0.5, 0.2, 0.0] and stats[ERRORS_METRIC] == 0.0


def test_a_function_that_cannot_reach_a_worker_is_refused():
    with pytest.raises(TypeError, match="cannot be sent to a worker process.*from_name"):
        RewardRunner(lambda response, answer: 1.0, timeout_s=1, num_workers=1)


def test_an_unknown_name_fails_at_construction(baseline):
    with pytest.raises(ValueError, match="'maths' is not a known reward"):
        RewardRunner.from_name("maths", timeout_s=1, num_workers=1)
    assert new_processes(baseline) == set()


def test_a_function_that_does_not_load_in_a_worker_raises(tmp_path):
    path = tmp_path / "parent_only.py"
    path.write_text(textwrap.dedent("""
        import multiprocessing
        if multiprocessing.parent_process() is not None:
            raise ImportError("only importable in the trainer")
        def score(response, answer):
            return 1.0
    """))
    with RewardRunner.from_name(f"{path}:score", timeout_s=5, num_workers=1) as runner:
        with pytest.raises(RewardWorkerError, match="could not load the function.*only importable in the trainer"):
            runner(["a"], ["a"])


# --------------------------------------------------------------------------- interface
def test_mismatched_lengths_are_a_caller_error(scripted):
    with RewardRunner.from_name(scripted, timeout_s=1, num_workers=1) as runner:
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            runner(["a", "b"], ["a"])


@pytest.mark.parametrize("kwargs", [{"timeout_s": 0, "num_workers": 1}, {"timeout_s": 1, "num_workers": 0}])
def test_invalid_settings(scripted, kwargs):
    with pytest.raises(ValueError):
        RewardRunner.from_name(scripted, **kwargs)


def test_math_reward_in_the_worker_processes():
    class Cfg:
        name, timeout_s, num_workers = "math", 30.0, 2

    with build_reward_runner(Cfg()) as runner:
        assert runner.reward_range == (0.0, 1.0)
        scores, stats = runner(
            ["\\boxed{0.5}", "\\boxed{\\{2,1\\}}", "\\boxed{7}", "nothing"] * 3,
            ["\\frac{1}{2}", "\\{1,2\\}", "8", "3"] * 3,
        )
    assert stats == {ERRORS_METRIC: 0.0, TIMEOUTS_METRIC: 0.0}
    assert scores == [1.0, 1.0, 0.0, 0.0] * 3


def test_concurrent_calls_are_serialized():
    runner = RewardRunner.from_name("max_digit", timeout_s=5, num_workers=2)
    results = []

    def call(answer):
        results.append(runner([answer] * 20, [answer] * 20))

    threads = [threading.Thread(target=call, args=(str(d),)) for d in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    runner.close()
    assert len(results) == 4
    assert all(scores == [1.0] * 20 and stats[ERRORS_METRIC] == 0.0 for scores, stats in results)
