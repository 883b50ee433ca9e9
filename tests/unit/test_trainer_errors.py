"""Bad input found while starting a run: a clear message and exit status 2, no traceback."""

import os

from tests.launch_utils import run_entry

BASE = ["--config", "examples/tiny_cpu.yaml", "max_steps=1", "eval.enabled=false", "logging.tensorboard=false"]


def _fails_cleanly(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-4000:]


def test_missing_dataset_and_model_paths(tmp_path):
    from liteppo_mcore.data import build_builtin_tokenizer

    build_builtin_tokenizer().save_pretrained(str(tmp_path / "tok"))
    proc = run_entry(BASE + [f"output_dir={tmp_path}/a", "data.builtin_task=null",
                             f"model.tokenizer_path={tmp_path}/tok", f"data.train_path={tmp_path}/nope.jsonl"],
                     timeout=180)
    _fails_cleanly(proc, "nope.jsonl")
    proc = run_entry(BASE + [f"output_dir={tmp_path}/b", f"model.hf_path={tmp_path}/no-model"], timeout=180)
    _fails_cleanly(proc, "no-model")


def test_run_directory_with_another_runs_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_entry(BASE + [f"output_dir={run_dir}"], timeout=180)
    assert first.returncode == 0, first.stderr[-4000:]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "iter_0000001"))
    proc = run_entry(BASE + [f"output_dir={run_dir}", "max_steps=2", "model.hidden_size=32"], timeout=180)
    _fails_cleanly(proc, "belongs to another run", "model.hidden_size: 64 there, 32 here", "new output_dir")
