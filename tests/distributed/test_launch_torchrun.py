"""The entry point under torchrun with 2 CPU processes (gloo)."""

from tests.launch_utils import run_entry


def test_torchrun_dry_run_two_processes():
    proc = run_entry(["--config", "examples/liteppo.yaml", "--dry-run"], nproc=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # printed once, by rank 0
    assert out.count("layout world 2 = tp 1 x pp 1 x cp 1 x dp 2 (backend gloo)") == 1
    assert out.count("dry run OK") == 1


def test_torchrun_bad_config_fails_with_the_message():
    proc = run_entry(["--config", "examples/liteppo.yaml", "parallel.tp=4", "--dry-run"], nproc=2)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "tp(4) * pp(1) * cp(1) = 4 does not divide WORLD_SIZE(2)" in out
    assert "exitcode  : 2" in out
    # torchrun prints its own summary; our processes print no traceback
    assert 'pretrain_liteppo.py", line' not in out
    assert "/liteppo_mcore/" not in out
