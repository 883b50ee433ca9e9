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
