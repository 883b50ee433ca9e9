"""The entry point under torchrun with 2 CPU processes (gloo)."""

from tests.launch_utils import run_entry


def test_torchrun_dry_run_two_processes(tmp_path):
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}/run", "--dry-run"], nproc=2)
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


def _root_cause(stderr):
    """The text torchrun's failure summary shows for the first observed failure."""
    block = stderr.split("Root Cause (first observed failure):", 1)[1]
    return block.split("traceback :", 1)[1].split("=" * 20, 1)[0]


def test_torchrun_shows_our_message_as_the_root_cause(tmp_path):
    from liteppo_mcore.data import build_builtin_tokenizer

    tokenizer = tmp_path / "tokenizer"
    build_builtin_tokenizer().save_pretrained(str(tokenizer))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "max:12", "answer": "2"}\n{"prompt": "max:3"\n')  # the second line is cut short
    proc = run_entry(["--config", "examples/tiny_cpu.yaml", f"output_dir={tmp_path}/run", "data.builtin_task=null",
                      f"data.train_path={bad}", f"model.tokenizer_path={tokenizer}", "reward.name=max_digit"],
                     nproc=2, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    cause = _root_cause(proc.stderr)
    assert cause.strip().startswith("liteppo: error on rank") and str(bad) in cause, proc.stderr[-3000:]
    assert "To enable traceback" not in cause
    assert proc.stderr.count("liteppo: error on rank") >= 1 and "/liteppo_mcore/" not in proc.stderr
    # a configuration error, found before any process group exists, the same way
    proc = run_entry(["--config", "examples/liteppo.yaml", "parallel.tp=4", "--dry-run"], nproc=2)
    assert "does not divide WORLD_SIZE(2)" in _root_cause(proc.stderr)
