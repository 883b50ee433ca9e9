"""The SLURM launch scripts (launch/slurm/): shell syntax, the rendezvous computed from SLURM's
variables, and real runs of the scripts on this machine with those variables set by hand (one node,
2 CPU processes, gloo). srun is replaced by a stand-in that records its options and runs the task in
place, so multi_node.sbatch runs unchanged; SGLang servers are replaced by tests/sglang_standin.py."""

import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from liteppo_mcore.parallel.setup import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_DIR = os.path.join(REPO, "launch", "slurm")
SCRIPTS = sorted(f for f in os.listdir(SLURM_DIR) if f.endswith((".sh", ".sbatch")))
HELPER = os.path.join(SLURM_DIR, "torchrun_cmd.sh")
TINY = ["max_steps=2", "eval.enabled=false", "checkpoint.save_interval=0", "logging.tensorboard=false",
        "logging.plot=false"]

# srun as the scripts call it: options (all written --name=value or --flag), then the command. It
# records both, and the environment the task would see, then runs the command on this machine.
FAKE_SRUN = """#!/bin/bash
printf 'srun %s\\n' "$*" >> "$FAKE_SRUN_LOG"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
printf 'task LITEPPO_SGLANG_URLS=%s MASTER_ADDR=%s MASTER_PORT=%s\\n' \\
    "${LITEPPO_SGLANG_URLS:-}" "${MASTER_ADDR:-}" "${MASTER_PORT:-}" >> "$FAKE_SRUN_LOG"
exec "$@"
"""


def _clean_env(**extra):
    """This environment without anything a launcher or SLURM would have set, plus `extra`."""
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RDZV_ID",
            "CONFIG", "GPUS_PER_NODE", "PYTHON", "VENV", "EXTRA_OVERRIDES", "TIMEOUT_MINUTES", "CONTAINER_IMAGE",
            "SHUTDOWN_TIMEOUT",
            "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "LITEPPO_", "SGLANG_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, env, timeout=180):
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _job_id_with_free_port():
    """A SLURM-style job id whose derived port (10000 + id % 20000) is free here right now."""
    for _ in range(200):
        port = random.randint(10000, 29999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 5 * 20000 + (port - 10000), port
    raise RuntimeError("no free port in 10000-29999")


@pytest.fixture
def fake_srun(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "srun.log"
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_SRUN_LOG": str(log)}, log


def _metrics_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["step"] for line in f]


# --- static checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", "-x", "-s", "bash", "-S", "warning", *SCRIPTS], cwd=SLURM_DIR,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_batch_scripts_log_to_job_name_and_id():
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        text = open(os.path.join(SLURM_DIR, name), encoding="utf-8").read()
        assert "#SBATCH --output=%x-%j.out" in text and "set -euo pipefail" in text, name
    assert "#SBATCH --ntasks-per-node=1" in open(os.path.join(SLURM_DIR, "multi_node.sbatch")).read()


def test_the_stop_signal_comes_early_and_torchrun_waits_for_the_save():
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        lines = open(os.path.join(SLURM_DIR, name), encoding="utf-8").read().splitlines()
        assert "#SBATCH --signal=B:TERM@120" in lines, name  # active, to the batch shell (B:), whose trap stops srun
    assert "--max_restarts 0 --shutdown-timeout 110 " in _print_cmd()
    assert "--shutdown-timeout 880 " in _print_cmd(SHUTDOWN_TIMEOUT=880)


# --- the command line, computed without running it ------------------------------------------------

def _print_cmd(**env):
    proc = _run([HELPER, "--print", "--", "train.lr=1e-6"], _clean_env(CONFIG="examples/tiny_cpu.yaml", **env),
                timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_rendezvous_from_the_slurm_node_list_and_job_id():
    cmd = _print_cmd(SLURM_JOB_NODELIST="gpu-a[007-009,012],gpu-b3", SLURM_NNODES=5, SLURM_JOB_ID=123456,
                     GPUS_PER_NODE=8)
    assert cmd.startswith(f"{sys.executable} -m torch.distributed.run --nnodes 5 --nproc_per_node 8 ")
    assert "--rdzv_backend c10d --rdzv_endpoint gpu-a007:13456 --rdzv_id 123456" in cmd  # 10000 + 123456 % 20000
    assert cmd.endswith(f"{REPO}/launch/pretrain_liteppo.py --config examples/tiny_cpu.yaml train.lr=1e-6")
    assert "--node_rank" not in cmd  # c10d numbers the nodes


def test_rendezvous_fallbacks_in_order():
    # an address already set wins over the node list, and so does a port
    cmd = _print_cmd(MASTER_ADDR="10.9.8.7", MASTER_PORT=23456, SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID=7)
    assert "--rdzv_endpoint 10.9.8.7:23456 --rdzv_id 7" in cmd
    # the training nodes (multi_node.sbatch with SGLang nodes) win over the job's node list
    cmd = _print_cmd(LITEPPO_TRAIN_NODELIST="n3,n4", SLURM_JOB_NODELIST="n[1-4]", SLURM_JOB_ID=7)
    assert "--rdzv_endpoint n3:10007" in cmd
    # no node list: the launch node's address; nothing at all: this host, torch's default port
    assert "--rdzv_endpoint 10.1.2.3:29500 --rdzv_id liteppo" in _print_cmd(SLURM_LAUNCH_NODE_IPADDR="10.1.2.3")
    assert f"--rdzv_endpoint {socket.gethostname()}:29500" in _print_cmd()


def test_environment_overrides_come_before_the_arguments():
    cmd = _print_cmd(EXTRA_OVERRIDES="max_steps=3 seed=5", TIMEOUT_MINUTES=30)
    assert cmd.endswith("--config examples/tiny_cpu.yaml max_steps=3 seed=5 parallel.timeout_minutes=30 train.lr=1e-6")


def test_nodelist_expansion():
    proc = _run(["-c", f'source "{HELPER}"; liteppo_expand_nodelist "r[1-2]-n[08-10],x,y[3]"'], _clean_env(),
                timeout=30)
    assert proc.stdout.split() == ["r1-n08", "r1-n09", "r1-n10", "r2-n08", "r2-n09", "r2-n10", "x", "y3"]


def test_missing_config_fails_fast():
    proc = _run([os.path.join(SLURM_DIR, "single_node.sbatch")], _clean_env(CONFIG="examples/nope.yaml"), timeout=30)
    assert proc.returncode == 2
    assert "CONFIG=examples/nope.yaml: no such file" in proc.stderr


# --- real runs: one node, 2 CPU processes -------------------------------------------------------

def test_single_node_script_sets_up_the_job(tmp_path):
    """single_node.sbatch runs torchrun itself (no srun); a dry run sets up the process groups over
    the rendezvous it computed. The full training run goes through multi_node.sbatch below."""
    job_id, port = _job_id_with_free_port()
    env = _clean_env(CONFIG="examples/tiny_cpu.yaml", GPUS_PER_NODE=2, SLURM_JOB_NODELIST="localhost",
                     SLURM_NNODES=1, SLURM_JOB_ID=job_id)
    proc = _run([os.path.join(SLURM_DIR, "single_node.sbatch"), f"output_dir={tmp_path}", "--dry-run"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the rendezvous the agent was started with came from the variables set above
    assert f"--rdzv_endpoint localhost:{port} --rdzv_id {job_id}" in proc.stderr
    assert "address: first host of SLURM_JOB_NODELIST=localhost" in proc.stderr
    assert "--nnodes 1 --nproc_per_node 2" in proc.stderr
    assert "layout world 2 = tp 1 x pp 1 x cp 1 x dp 2 (backend gloo)" in proc.stdout
    assert "dry run OK" in proc.stdout


def test_multi_node_script_trains_through_srun(tmp_path, fake_srun):
    srun_env, srun_log = fake_srun
    job_id, port = _job_id_with_free_port()
    run_dir = str(tmp_path / "run")
    env = _clean_env(CONFIG="examples/tiny_cpu.yaml", GPUS_PER_NODE=2, SLURM_JOB_NODELIST="127.0.0.[1]",
                     SLURM_NNODES=1, SLURM_JOB_ID=job_id, **srun_env)
    proc = _run([os.path.join(SLURM_DIR, "multi_node.sbatch"), *TINY, f"output_dir={run_dir}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert _metrics_steps(run_dir) == [1, 2]
    calls = srun_log.read_text().splitlines()
    assert len(calls) == 2  # one srun (training), then its task's environment
    assert calls[0].startswith("srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist=127.0.0.1 ")
    assert calls[0].endswith(f"launch/slurm/torchrun_cmd.sh -- {' '.join(TINY)} output_dir={run_dir}")
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in calls[1]
    assert f"--rdzv_endpoint 127.0.0.1:{port} --rdzv_id {job_id}" in proc.stderr
    assert "address: first host of LITEPPO_TRAIN_NODELIST=127.0.0.1" in proc.stderr  # from 127.0.0.[1]
    assert "layout world 2 = tp 1 x pp 1 x cp 1 x dp 2 (backend gloo)" in proc.stdout


def test_disaggregated_sglang_nodes(tmp_path, fake_srun):
    """The last node runs the (stand-in) servers; training on the first waits for /health, gets the
    URLs, and the servers are stopped when the job ends. The payload is a dry run."""
    srun_env, srun_log = fake_srun
    job_id, port = _job_id_with_free_port()
    server_port = free_port()
    env = _clean_env(CONFIG="examples/tiny_cpu.yaml", GPUS_PER_NODE=2, SLURM_JOB_NODELIST="127.0.0.1,localhost",
                     SLURM_NNODES=2, SLURM_JOB_ID=job_id, SGLANG_NODES=1, SGLANG_MODEL="/models/m",
                     SGLANG_PORT=server_port, SGLANG_POLL_S="0.3",
                     SGLANG_LAUNCHER=f"{sys.executable} {REPO}/tests/sglang_standin.py", **srun_env)
    proc = _run([os.path.join(SLURM_DIR, "multi_node.sbatch"), f"output_dir={tmp_path}", "--dry-run"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    url = f"http://localhost:{server_port}"
    assert f"SGLang servers healthy: {url}" in proc.stderr
    assert "dry run OK" in proc.stdout
    assert "layout world 2 = tp 1 x pp 1 x cp 1 x dp 2" in proc.stdout  # only the training node's 2 processes
    calls = srun_log.read_text().splitlines()
    servers, training = calls[0], calls[2]
    assert servers.startswith("srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist=localhost ")
    assert servers.endswith("launch/slurm/sglang_servers.sh")
    assert training.startswith("srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --nodelist=127.0.0.1 ")
    assert f"rollout.mode=disaggregated rollout.server_urls=['{url}']" in training
    assert calls[3].startswith(f"task LITEPPO_SGLANG_URLS={url} MASTER_ADDR=127.0.0.1 ")
    assert "--tp-size 2 --base-gpu-id 0" in proc.stdout  # one server on all of the node's 2 "GPUs"
    with socket.socket() as s:  # stopped at the end of the job
        assert s.connect_ex(("127.0.0.1", server_port)) != 0


def test_bad_config_fails_before_anything_starts(fake_srun):
    srun_env, srun_log = fake_srun
    env = _clean_env(CONFIG="examples/tiny_cpu.yaml", GPUS_PER_NODE=2, SLURM_JOB_NODELIST="localhost",
                     SLURM_NNODES=1, SLURM_JOB_ID=99, **srun_env)
    proc = _run([os.path.join(SLURM_DIR, "multi_node.sbatch"), "reward_nrom=group"], env, timeout=60)
    assert proc.returncode == 2
    assert "reward_nrom: unknown configuration key (on the command line). Did you mean `reward_norm`?" in proc.stderr
    assert "invalid for WORLD_SIZE=2" in proc.stderr and "nothing was launched" in proc.stderr
    assert not srun_log.exists()


def test_bad_config_fails_in_torchrun_with_the_message():
    job_id, _ = _job_id_with_free_port()
    env = _clean_env(CONFIG="examples/tiny_cpu.yaml", GPUS_PER_NODE=2, SLURM_JOB_NODELIST="localhost",
                     SLURM_NNODES=1, SLURM_JOB_ID=job_id, LITEPPO_PRECHECK=0)
    proc = _run([os.path.join(SLURM_DIR, "single_node.sbatch"), "reward_nrom=group"], env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Did you mean `reward_norm`?" in out
    assert "exitcode  : 2" in out  # torchrun's summary: our exit status for a bad configuration
    assert "training failed" in out
