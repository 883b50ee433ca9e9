"""The weight-sync benchmark runs end to end in its CPU small mode: every case, finite rates, and the stream
carries exactly the model's bytes (a tied output layer once, vocabulary padding trimmed).

It runs in a subprocess (fresh process group, megatron state and CUDA hidden) under a hard time limit:
about 10 s on an idle 2-core machine.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from bench_weight_sync import SIZES  # noqa: E402

from tests.gpu.check_report import SUMMARIES  # noqa: E402

TIMEOUT_S = 240


def _finite_positive(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["case"], key, value)


def _expected_bytes(shape, element_size=4):
    """Qwen2-shaped actor, tied embeddings, QKV bias, the real (unpadded) vocabulary, counted by hand."""
    h, f, v = shape["hidden_size"], shape["ffn_hidden_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    q, kv = h, 2 * shape["num_query_groups"] * d
    layer = (q + kv) * h + (q + kv) + h * h + 3 * h * f + 2 * h
    return (shape["num_layers"] * layer + v * h + h) * element_size


def test_cpu_small_mode_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_weight_sync.py"), "--device", "cpu",
                           "--size", "small", "--repeats", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["dtype"] == "float32" and result["device"] == "cpu" and result["world_size"] == 1

    # the stream's bytes are the model's bytes: by hand, from megatron's parameters, and the hf model's
    shape = SIZES["small"]["shape"]
    assert result["padded_vocab_size"] > shape["vocab_size"]  # the trimming is exercised
    expected = _expected_bytes(shape)
    assert result["exported_bytes"] == result["model_bytes"] == result["hf_model_bytes"] == expected
    assert result["baseline_bytes_rank0"] == expected
    assert result["loaded_matches_actor"] is True

    rows = {row["case"]: row for row in result["rows"]}
    buckets = SIZES["small"]["buckets_mib"]
    assert list(rows) == (["state_dict copy (per tensor)", "flat copy (one tensor)"]
                          + [f"{kind}, bucket {mib:g} MiB" for mib in buckets
                             for kind in ("export", "export + hf load")])
    for row in rows.values():
        _finite_positive(row, ["median_s", "min_s", "gb_per_s", "time_vs_state_dict_copy", "bytes"])
        assert len(row["times_s"]) == 3 and row["cuda_peak_extra_bytes"] is None
    for mib in buckets:
        for kind in ("export", "export + hf load"):
            row = rows[f"{kind}, bucket {mib:g} MiB"]
            assert row["bytes"] == expected and row["buckets"] >= 1
            # the exporter holds at most one bucket plus one tensor's in-flight copies
            assert 0 < row["exporter_peak_bytes"] <= max(row["bucket_bytes"], row["max_tensor_bytes"]) \
                + 2 * row["max_tensor_bytes"]
    smallest, largest = (rows[f"export, bucket {mib:g} MiB"] for mib in (buckets[0], buckets[-1]))
    assert smallest["buckets"] > largest["buckets"]
    # the table is printed last
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f"export + hf load, bucket {buckets[-1]:g} MiB")
    assert SUMMARIES["bench_weight_sync"](result)["headline"].startswith("export + hf load best ")  # gpu_check


def test_pipeline_run_under_the_strict_mode_sends_device_tensors(tmp_path):
    """`--device cuda --pp 2` on a CPU machine under LITEPPO_STRICT_DEVICE=1 (two torchrun processes): the
    slowest-rank timing and the byte count over PP go over groups that are NCCL on a GPU machine, so their
    tensors must be on the device; the stream still carries exactly the model's bytes."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", LITEPPO_STRICT_DEVICE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_weight_sync.py"), "--device", "cuda",
                           "--size", "small", "--dtype", "fp32", "--pp", "2", "--warmup", "0", "--repeats", "1",
                           "--buckets-mib", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["strict_device"] is True and result["world_size"] == 2 and result["pp"] == 2
    assert result["exported_bytes"] == result["model_bytes"] == _expected_bytes(SIZES["small"]["shape"])
    assert [row["case"] for row in result["rows"]][-1] == "export + hf load, bucket 1 MiB"
