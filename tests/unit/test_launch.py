"""The entry point run with plain python: dry run, bad configurations, --print-config."""

import os

import pytest
import torch
import yaml

from liteppo_mcore.config import load_config
from tests.launch_utils import REPO, run_entry


def test_dry_run_exits_0_and_prints_the_layout(tmp_path):
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}/run", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "layout world 1 = tp 1 x pp 1 x cp 1 x dp 1 (backend gloo)" in proc.stdout
    assert "dry run OK" in proc.stdout and "paths, tokenizer, data and checkpoints checked" in proc.stdout
    assert "adv_estimator:" not in proc.stdout  # the configuration goes to config.yaml, not the console
    # exactly the two lines README.md's "Running" quotes (no kernels line: a dry run runs no kernels)
    lines = proc.stdout.splitlines()
    assert lines == ["liteppo: layout world 1 = tp 1 x pp 1 x cp 1 x dp 1 (backend gloo)",
                     "liteppo: dry run OK: configuration valid for this world size; paths, tokenizer, data and "
                     "checkpoints checked"], lines
    readme = " ".join(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().split())
    assert f"`{lines[1]}` (exit 0)" in readme
    assert "`liteppo: the dry run found N problem(s) the launch would hit:`" in readme


def test_dry_run_lists_every_input_the_launch_would_miss(tmp_path):
    # examples/liteppo.yaml names a model folder and data files this checkout does not have
    proc = run_entry(["--config", "examples/liteppo.yaml", f"output_dir={tmp_path}/run", "--dry-run"])
    assert proc.returncode == 2, proc.stdout[-2000:]
    err = proc.stderr
    assert "the dry run found 4 problem(s)" in err, err
    assert "model.hf_path='checkpoints/Qwen3-4B-Base': no such directory" in err
    assert "checkpoints/Qwen3-4B-Base" in err.split("\n  - ")[2]  # the tokenizer comes from there too
    assert "data.train_path='data/math_train.jsonl': no such file" in err
    assert "data.eval_path='data/math_test.jsonl': no such file" in err
    assert "Traceback" not in err


def test_dry_run_checks_the_first_records_and_the_run_directory(tmp_path):
    from liteppo_mcore.data import build_builtin_tokenizer

    tokenizer = tmp_path / "tok"
    build_builtin_tokenizer().save_pretrained(str(tokenizer))
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "max:12", "answer": "2"}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.lock").write_text('{"host": "another-node", "pid": 1, "started": "now"}')
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}/run", "data.builtin_task=null",
                      f"data.train_path={data}", f"model.tokenizer_path={tokenizer}", "--dry-run"])
    assert proc.returncode == 2
    assert "has no 'prompt'" in proc.stderr or "data.prompt_key" in proc.stderr, proc.stderr
    assert "is in use by another run" in proc.stderr and "another-node" in proc.stderr


def test_group_of_one_exits_2_naming_the_key_without_traceback():
    proc = run_entry(["--config", "examples/liteppo.yaml", "reward_norm=group",
                      "num_return_sequences_in_group=1", "--dry-run"])
    assert proc.returncode == 2
    assert "num_return_sequences_in_group" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_misspelled_key_exits_2_and_suggests_the_right_one():
    proc = run_entry(["--config", "examples/liteppo.yaml", "reward_nrom=group", "--dry-run"])
    assert proc.returncode == 2
    assert "reward_nrom" in proc.stderr and "Did you mean `reward_norm`?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_config_file_exits_2():
    proc = run_entry(["--config", "examples/nope.yaml", "--dry-run"])
    assert proc.returncode == 2
    assert "examples/nope.yaml: no such file" in proc.stderr


def test_print_config_prints_the_resolved_yaml(tmp_path):
    proc = run_entry(["--config", "examples/ppo_gae.yaml", "train.lr=3e-6", "--print-config"])
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 3e-6 and printed["adv_estimator"] == "gae"
    path = tmp_path / "resolved.yaml"
    path.write_text(proc.stdout)
    assert load_config(str(path)) == load_config("examples/ppo_gae.yaml", ["train.lr=3e-6"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_nccl_without_cuda_is_a_clean_error():
    proc = run_entry(["--config", "examples/liteppo.yaml", "parallel.backend=nccl", "--dry-run"])
    assert proc.returncode == 2 and "parallel.backend=nccl needs CUDA" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_output_dir_that_cannot_hold_a_run_exits_2_in_the_dry_run(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    for path, reason in ((a_file, "is a file, not a directory"), (a_file / "run", "which is a file")):
        proc = run_entry(["--config", "examples/liteppo.yaml", f"output_dir={path}", "--dry-run"])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"output_dir={path}" in proc.stderr and reason in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_a_read_only_output_dir_is_named(tmp_path, monkeypatch):
    """(As root, permissions do not stop writes, so the access check itself is what is tested.)"""
    import os

    from liteppo_mcore.config.validate import output_dir_problem

    assert output_dir_problem(str(tmp_path / "new" / "run")) is None
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert output_dir_problem(str(tmp_path / "new" / "run")) == (
        f"{tmp_path} is not writable (so {tmp_path / 'new' / 'run'} cannot be created)")


def test_print_config_needs_no_launcher_world_size():
    import glob
    import os
    import subprocess
    import sys

    from tests.launch_utils import ENTRY, REPO

    recipes = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
    big = [r for r in recipes if load_config(r, check=False).parallel.tp > 1]
    assert big, "a recipe with tensor parallelism is the case this guards"
    for recipe in recipes:
        proc = run_entry(["--config", recipe, "--print-config"])  # plain python: no WORLD_SIZE
        assert proc.returncode == 0, (recipe, proc.stderr[-2000:])
        assert yaml.safe_load(proc.stdout)["parallel"]["tp"] == load_config(recipe, check=False).parallel.tp
    # a launcher's WORLD_SIZE still counts
    env = {**os.environ, "WORLD_SIZE": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, ENTRY, "--config", big[0], "--print-config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not divide WORLD_SIZE(3)" in proc.stderr, proc.stderr[-2000:]


def test_the_launcher_runs_the_exit_hooks_and_skips_the_interpreters_finalization(tmp_path):
    """A finished run ends through exit_now: flushed, the atexit hooks run (servers and reward workers are
    stopped there), but no finalization, in which a gloo worker still releasing the last collective's
    tensors asks for the GIL and aborts the process (SIGABRT after a successful run). The probe: an atexit
    hook, and a thread that prints once the interpreter starts finalizing (threading's shutdown callbacks
    are the first step of it); a plain interpreter shows both (the control)."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, threading\n"
        "atexit.register(lambda: print('exit hook ran', flush=True))\n"
        "_finalizing = threading.Event()\n"
        "threading._register_atexit(_finalizing.set)\n"
        "def _probe():\n"
        "    _finalizing.wait()\n"
        "    print('finalized', flush=True)\n"
        "threading.Thread(target=_probe, name='finalization-probe').start()\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    control = subprocess.run([sys.executable, "-c", "print('done')"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env})
    assert control.stdout.splitlines() == ["done", "finalized", "exit hook ran"], control

    # a dry run: a gloo group with its worker threads, a last object collective
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}/run", "--dry-run"], env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "exit hook ran" and "finalized" not in lines, lines
    assert lines[-2].startswith("liteppo: dry run OK")  # the output came through whole, before the hooks

    proc = run_entry(["--config", "examples/tiny_cpu.yaml", "no_such_key=1"], env=env)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr, proc.stderr  # the status is kept
    assert proc.stdout.splitlines() == ["exit hook ran"], proc.stdout
