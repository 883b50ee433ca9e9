"""The job scripts in launch/slurm/ submitted for real, with `sbatch --wait`, to a throw-away SLURM cluster
on this machine (tests/slurm/cluster.py): one node, and two nodes (two slurmd on one host).

The payload is examples/tiny_cpu.yaml for two steps on CPU (gloo), GPUS_PER_NODE=2 processes per node.
The scripts' own resource requests (8 GPUs, 24-48 h, exclusive nodes) are overridden on the sbatch
command line so that they fit the machine; their settings go in through `--export=ALL,...` as a user
would pass them.

Where the machine cannot host the cluster (not root, no apt-get, the install fails) the tests skip with
the reason; LITEPPO_REQUIRE_SLURM=1 (set by CI) turns that skip into a failure.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest

from tests.launch_utils import REPO, run_entry
from tests.slurm.cluster import JobResult, SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow

REQUIRE_ENV = "LITEPPO_REQUIRE_SLURM"
CONFIG = "examples/tiny_cpu.yaml"
PAYLOAD = ["max_steps=2", "eval.enabled=false", "checkpoint.save_interval=0", "logging.tensorboard=false"]
PROCS_PER_NODE = 2
JOB_TIMEOUT_S = 240         # per sbatch --wait; the jobs below take 5-40 s
# Inputs of the job scripts (launch/slurm/*.sbatch, torchrun_cmd.sh): the test sets those it wants and
# drops any the calling shell might have exported, so that the jobs see exactly what each test gives.
SCRIPT_INPUTS = ("CONFIG", "GPUS_PER_NODE", "PYTHON", "VENV", "EXTRA_OVERRIDES", "TIMEOUT_MINUTES",
                 "RDZV_JOIN_TIMEOUT", "RDZV_ID", "MASTER_ADDR", "MASTER_PORT", "CONTAINER_IMAGE",
                 "CONTAINER_MOUNTS", "CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOGLEVEL")
SCRIPT_INPUT_PREFIXES = ("LITEPPO_", "SGLANG_", "TORCHELASTIC_")


# ---- the clusters --------------------------------------------------------------------------------

def _unavailable(reason: str) -> None:
    """Skip, or fail where the environment says this machine must run the SLURM tests."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the SLURM tests cannot run here: {reason}", pytrace=False)
    pytest.skip(f"no local SLURM cluster: {reason} (set {REQUIRE_ENV}=1 to make this a failure)")


def _cluster(nodes: int):
    """A running cluster for the tests of one class; torn down (daemons stopped) whatever happens."""
    cluster = SlurmCluster(nodes)
    try:
        cluster.__enter__()         # stops what it started if bringing it up fails
    except SlurmUnavailable as e:
        _unavailable(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="class")
def one_node():
    yield from _cluster(1)


@pytest.fixture(scope="class")
def two_nodes():
    yield from _cluster(2)


# ---- submitting ----------------------------------------------------------------------------------

def _submit(cluster: SlurmCluster, script: str, tmp_path, *, nodes: int, overrides, name: str) -> JobResult:
    """sbatch --wait launch/slurm/<script> from the repository root, sized to this machine."""
    env = {k: v for k, v in cluster.env.items()
           if k not in SCRIPT_INPUTS and not k.startswith(SCRIPT_INPUT_PREFIXES)}
    job_tmp = tmp_path / f"{name}-tmp"      # torchrun's log dirs and the like stay in the test's tmp
    job_tmp.mkdir()
    exports = {
        "CONFIG": CONFIG,
        "GPUS_PER_NODE": str(PROCS_PER_NODE),
        "PYTHON": sys.executable,            # the interpreter of the reference run below
        "RDZV_JOIN_TIMEOUT": "60",           # a node that cannot join fails the job in a minute, not 15
        "TIMEOUT_MINUTES": "2",              # parallel.timeout_minutes: a stuck collective fails soon too
        "LOGLEVEL": "INFO",                  # torchrun's agents log their rendezvous: which ranks where
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(job_tmp),
        # the suite's strict virtual-device mode, as in the reference runs (it changes the GPU/CPU code
        # paths, megatron's weight initialization among them)
        "LITEPPO_STRICT_DEVICE": os.environ.get("LITEPPO_STRICT_DEVICE", "0"),
    }
    sbatch_args = [
        f"--job-name=liteppo-{name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={min(PROCS_PER_NODE, cluster.cpus_per_node)}",
        f"--mem={min(4096, cluster.real_memory_mb)}M",
        "--time=5",
        "--gpus-per-node=0",                 # the scripts ask for 8 GPUs; this cluster has none
        "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()),
    ]
    return cluster.submit_and_wait(f"launch/slurm/{script}", sbatch_args, overrides,
                                   output=str(tmp_path / f"{name}-%j.out"), timeout=JOB_TIMEOUT_S, cwd=REPO,
                                   env=env)


def _describe(job: JobResult, cluster: SlurmCluster) -> str:
    return (f"job {job.job_id}: sbatch exit {job.returncode}, state {job.state}, "
            f"ExitCode {job.info.get('ExitCode')}\nsbatch: {job.sbatch_output}\n"
            f"--- job output (end) ---\n{job.output[-8000:]}\n--- daemons ---\n{cluster.logs()}")


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def _assert_trained(job: JobResult, cluster: SlurmCluster, run_dir, *, nodes: int) -> None:
    """The job COMPLETED; every node's agent started its ranks against the rendezvous on the first host
    of the allocation; together they made one world of nodes x PROCS_PER_NODE; metrics were written."""
    why = _describe(job, cluster)
    assert job.returncode == 0, why
    assert job.job_id is not None, why
    assert job.state == "COMPLETED" and job.info.get("ExitCode") == "0:0", why
    assert int(job.info["NumNodes"]) == nodes, why
    out = job.output
    assert "liteppo-slurm: training finished" in out, why

    # Rendezvous: the first host of the allocation's node list, and the port derived from the job id.
    hosts = cluster.client(["scontrol", "show", "hostnames", job.info["NodeList"]], timeout=15).stdout.split()
    assert len(hosts) == nodes and set(hosts) == set(cluster.node_names[:nodes]), (hosts, why)
    endpoint = f"{hosts[0]}:{10000 + int(job.job_id) % 20000}"
    assert f"rendezvous {endpoint} (" in out, (endpoint, why)
    launches = re.findall(r"liteppo-slurm: exec: .*--rdzv_endpoint (\S+) ", out)
    assert launches == [endpoint] * nodes, (launches, endpoint, why)   # one torchrun per node, same endpoint

    # Every rank: each agent logs the global ranks it started; together they are the whole world.
    world = nodes * PROCS_PER_NODE
    agents = re.findall(r"group_rank=(\d+)", out)
    ranks = [r for group in re.findall(r"global_ranks=\[([\d, ]*)\]", out) for r in group.split(",")]
    sizes = re.findall(r"global_world_sizes=\[([\d, ]*)\]", out)
    assert sorted(int(a) for a in agents) == list(range(nodes)), why
    assert sorted(int(r) for r in ranks) == list(range(world)), why
    assert all({int(s) for s in group.split(",")} == {world} for group in sizes) and len(sizes) == nodes, why
    assert out.count("worker group successfully finished") == nodes, why
    layout = f"layout world {world} = tp 1 x pp 1 x cp 1 x dp {world} (backend gloo)"
    assert out.count(layout) == 1, why                               # printed by rank 0 only

    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2], why
    for row in rows:
        for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy"):
            assert row.get(key) is not None and math.isfinite(row[key]), (row["step"], key)


def _assert_config_error(job: JobResult, cluster: SlurmCluster, run_dir) -> None:
    """The job FAILED with sbatch's exit non-zero, the output names the bad key and its fix, and no
    training process was started (the scripts validate the configuration before launching)."""
    why = _describe(job, cluster)
    assert job.job_id is not None, why
    assert job.returncode != 0, why
    assert job.state == "FAILED", why
    assert "reward_nrom: unknown configuration key" in job.output, why
    assert "Did you mean `reward_norm`?" in job.output, why
    assert "Traceback" not in job.output, why
    assert not os.path.exists(run_dir), why


# ---- the tests -----------------------------------------------------------------------------------

class TestOneNode:
    """single_node.sbatch on a one-node cluster."""

    def test_trains_with_two_processes(self, one_node, tmp_path):
        run_dir = tmp_path / "run"
        job = _submit(one_node, "single_node.sbatch", tmp_path, nodes=1, name="single",
                      overrides=[*PAYLOAD, f"output_dir={run_dir}"])
        _assert_trained(job, one_node, run_dir, nodes=1)

    def test_bad_config_key_fails_the_job(self, one_node, tmp_path):
        run_dir = tmp_path / "run"
        job = _submit(one_node, "single_node.sbatch", tmp_path, nodes=1, name="single-bad",
                      overrides=[*PAYLOAD, f"output_dir={run_dir}", "reward_nrom=group"])
        _assert_config_error(job, one_node, run_dir)


class TestTwoNodes:
    """multi_node.sbatch on a two-node cluster: one torchrun per node, one world of 4 ranks."""

    def test_trains_across_both_nodes_like_one_node_of_four(self, two_nodes, tmp_path):
        run_dir = tmp_path / "run"
        job = _submit(two_nodes, "multi_node.sbatch", tmp_path, nodes=2, name="multi",
                      overrides=[*PAYLOAD, f"output_dir={run_dir}"])
        _assert_trained(job, two_nodes, run_dir, nodes=2)

        # The same configuration with 4 processes on one node (torchrun directly): data parallel 4 both
        # times, so every metric but timings must agree.
        ref_dir = tmp_path / "reference"
        proc = run_entry(["--config", CONFIG, *PAYLOAD, f"output_dir={ref_dir}"], nproc=2 * PROCS_PER_NODE,
                         timeout=JOB_TIMEOUT_S, env={"TMPDIR": str(tmp_path)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        got, want = _metrics(run_dir), _metrics(ref_dir)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            g, w = _comparable(g), _comparable(w)
            assert sorted(g) == sorted(w), (g["step"], set(g) ^ set(w))
            for key in w:
                same = (g[key] == w[key] if g[key] is None or w[key] is None
                        else math.isclose(g[key], w[key], rel_tol=1e-6, abs_tol=1e-12))
                assert same, (w["step"], key, g[key], w[key])

    def test_bad_config_key_fails_the_job(self, two_nodes, tmp_path):
        run_dir = tmp_path / "run"
        job = _submit(two_nodes, "multi_node.sbatch", tmp_path, nodes=2, name="multi-bad",
                      overrides=[*PAYLOAD, f"output_dir={run_dir}", "reward_nrom=group"])
        _assert_config_error(job, two_nodes, run_dir)

    def test_error_after_launch_fails_the_job(self, two_nodes, tmp_path):
        """A configuration that validates but fails on every rank at start-up (no tokenizer): the srun
        step fails on both nodes, the job FAILS promptly, and rank 0's message is in the output."""
        run_dir = tmp_path / "run"
        job = _submit(two_nodes, "multi_node.sbatch", tmp_path, nodes=2, name="multi-runtime",
                      overrides=[*PAYLOAD, f"output_dir={run_dir}", "data.builtin_task=null",
                                 f"data.train_path={tmp_path / 'missing.jsonl'}"])
        why = _describe(job, two_nodes)
        assert job.returncode != 0 and job.state == "FAILED", why
        assert "liteppo: error on rank 0: no tokenizer" in job.output, why
        assert "liteppo-slurm: training failed" in job.output, why
