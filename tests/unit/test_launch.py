"""The entry point run with plain python: dry run, bad configurations, --print-config."""

import pytest
import torch
import yaml

from liteppo_mcore.config import load_config
from tests.launch_utils import run_entry


def test_dry_run_exits_0_and_prints_layout_and_config():
    proc = run_entry(["--config", "examples/liteppo.yaml", "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert "layout world 1 = tp 1 x pp 1 x cp 1 x dp 1 (backend gloo)" in proc.stdout
    assert "dry run OK" in proc.stdout
    assert "adv_estimator: reinforce" in proc.stdout


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
