"""The trainer end to end with `rollout.engine: sglang`, colocated, for both ends of the supported range.

`rollout.server_command` starts the stand-in server (tests/sglang_standin.py, a model of SGLang's state
machine per version, read from the wheels) through our launcher, as users start SGLang from another
environment. The stand-in runs a tiny transformers model fed by the buckets the trainer pushes (the
CPU wire format), returns tokens of the right vocabulary with their log-probs and the weight version,
and records every violation a real server would crash on or that breaks the memory plan: an update
outside the weight-update session (0.5.23), a generation on released or garbage weights, the KV cache
resumed before the push. A run of several steps, through evaluations, a checkpoint and a resume, must
finish with none of them, generate on exactly the weights just pushed, and agree with the trainer's
log-probs (rollout/logprob_abs_diff and the probe of rollout.check_weight_sync).
"""

import json
import math
import os
import sys

import pytest
import torch

from tests.launch_utils import run_entry

CONFIG = "examples/tiny_cpu.yaml"
VERSIONS = ("0.5.20", "0.5.23")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face folder of the embedded default's shape: config, random weights, the built-in
    task's tokenizer (SGLang and the trainer both start from model.hf_path)."""
    import transformers

    from liteppo_mcore.data.builtin_tokenizer import build_builtin_tokenizer

    path = str(tmp_path_factory.mktemp("hf"))
    tokenizer = build_builtin_tokenizer()
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(run_dir, hf_dir, version, name, *overrides):
    state_file = os.path.join(os.path.dirname(run_dir), f"standin_{name}.json")
    command = [sys.executable, "-m", "tests.sglang_standin", "--sglang-version", version, "--state-file", state_file]
    args = ["--config", CONFIG, f"output_dir={run_dir}", f"model.hf_path={hf_dir}", "rollout.engine=sglang",
            "rollout.mode=colocated", "rollout.server_command=[" + ",".join(command) + "]",
            "rollout.check_weight_sync=true", "rollout.server_start_timeout_s=120", "rollout.request_timeout_s=120",
            "rollout_batch_size=8", "train.mini_batch_size=64", "train.micro_batch_size=64", "eval.max_prompts=16",
            "eval.interval=2", "logging.log_interval=1",
            "logging.tensorboard=false", "checkpoint.save_interval=2", *overrides]
    proc = run_entry(args, nproc=1, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(state_file, encoding="utf-8") as f:
        return json.load(f)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("version", VERSIONS)
def test_training_through_evaluation_and_resume(tmp_path, hf_dir, version):
    run_dir = str(tmp_path / "run")
    first = _run(run_dir, hf_dir, version, "first", "max_steps=2")
    resumed = _run(run_dir, hf_dir, version, "resumed", "max_steps=3")  # from the step-2 checkpoint
    for state in (first, resumed):
        assert state["version"] == version
        assert state["violations"] == [], state["violations"]
        assert state["generations"], "the stand-in generated nothing"
    for state in (first, resumed):
        events = state["events"]
        assert ("session_begin" in events) == (version == "0.5.23")  # the session where the version has it
        assert events.count("pushed") >= 2 and "weights_garbage" in events  # released, then pushed again
        versions = {g.get("weight_version") for g in state["generations"]}
        assert "default" not in versions  # never on the weights the server loaded itself
        assert not any(g["garbage_weights"] or g["initial_weights"] or g["unreceived_weights"]
                       for g in state["generations"])
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    for row in rows[1:]:
        assert row["actor/skipped_updates"] == 0
        diff = row["rollout/logprob_abs_diff"]
        assert math.isfinite(diff) and diff < 1e-4, (row["step"], diff)  # generated with the trainer's weights
