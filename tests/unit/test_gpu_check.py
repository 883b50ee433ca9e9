"""tools/gpu_check.sh without a GPU: its --dry-run checks every path and benchmark argument a GPU run uses
(a wrong one fails here), that tests/gpu collects, and writes gpu_check.json with every step marked "dry"
and the table last; bad usage and missing wheels fail. Also the non-CUDA logic of tests/gpu: the trainer
configurations of its matrix load, the metric checks, the host-sync summary, the skip/require rules and
the report's bench summaries."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from tests.gpu import check_report as R
from tests.gpu import helpers as H

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
STEPS = ["install", "env", "tests", "bench_logprob", "bench_weight_sync", "bench_train_step", "bench_rollout"]
WHEEL_FILES = ["megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
               "omegaconf-2.4.0-py3-none-any.whl", "antlr4_python3_runtime-4.9.3-py3-none-any.whl",
               "math_verify-0.9.0-py3-none-any.whl", "latex2sympy2_extended-1.11.0-py3-none-any.whl"]
TIMEOUT_S = 240


def _wheels(tmp_path, files=WHEEL_FILES):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"")  # the dry run looks at names only
    return folder


def _check(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LITEPPO_WHEELS")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(["bash", SCRIPT, "--python", sys.executable, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=full_env, cwd=ROOT)


def _result(out):
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_checks_every_step_and_writes_the_json(tmp_path):
    out = tmp_path / "out"
    proc = _check("--dry-run", "--wheels", str(_wheels(tmp_path)), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = _result(out)
    assert result["mode"] == "dry" and result["passed"] is True
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == STEPS
    assert all(s["status"] == "dry" for s in steps.values()), [(s["name"], s["status"], s["note"])
                                                               for s in steps.values()]
    assert "megatron-core" in steps["install"]["note"] and "math-verify" in steps["install"]["note"]
    collected = steps["tests"]["headline"]
    assert "tests collected" in collected and int(collected.split("dry run: ")[1].split()[0]) >= 20
    for name in STEPS[3:]:  # each benchmark parsed the arguments of the real run: CUDA, full size
        args = steps[name]["args"]
        assert (args["device"], args["size"], args["dtype"]) == ("cuda", "full", "bf16"), name
        assert args["out"] == str(out / f"{name}.json")
        assert steps[name]["command"][1] == f"tools/{name}.py"
    assert steps["bench_train_step"]["args"]["micro_batches"] == [2, 4]
    assert steps["bench_rollout"]["args"]["batches"] == [64, 256]
    assert result["wheels"]["required"]["megatron-core"] == WHEEL_FILES[0] and result["budget_s"] == 300
    # the table is printed last: a header, then one line per step in order
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-len(STEPS) - 2].startswith("gpu check (dry) | PASSED")
    assert [line.split()[0] for line in lines[-len(STEPS):]] == STEPS


def test_quick_dry_run_selects_a_subset(tmp_path):
    out = tmp_path / "out"
    proc = _check("--dry-run", "--quick", "--wheels", str(_wheels(tmp_path)), "--out", str(out),
                  "--only", "tests,bench_train_step,bench_rollout")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = _result(out)
    steps = {s["name"]: s for s in result["steps"]}
    assert list(steps) == ["install", "env", "tests", "bench_train_step", "bench_rollout"]
    assert result["budget_s"] == 150 and result["selection"] == "quick"
    assert steps["bench_train_step"]["args"]["micro_batches"] == [2]
    assert steps["bench_train_step"]["args"]["offload_row"] is False
    assert steps["bench_rollout"]["args"]["batches"] == [64] and steps["bench_rollout"]["args"]["skip_megatron"]
    assert "-k" in steps["tests"]["command"]


def test_missing_wheels_and_bad_usage_fail(tmp_path):
    out = tmp_path / "out"
    proc = _check("--dry-run", "--wheels", str(tmp_path / "none"), "--out", str(out), "--only", "tests")
    assert proc.returncode == 1, proc.stdout[-2000:]
    result = _result(out)
    assert result["passed"] is False and result["steps"][0]["status"] == "failed"
    assert "missing required wheels" in result["steps"][0]["note"]
    for bad in (["--only", "bench_nothing"], ["--budget-s", "soon"], ["--frobnicate"]):
        proc = _check("--dry-run", "--out", str(out), *bad)
        assert proc.returncode == 2 and "gpu_check:" in proc.stderr, (bad, proc.stderr)


def test_help_and_shellcheck():
    proc = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--wheels DIR" in proc.stdout
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    lint = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout


# ------------------------------------------------------------------------------------------ tests/gpu logic
def test_every_trainer_configuration_of_the_gpu_matrix_loads(tmp_path):
    for engine in H.ENGINES:
        for variant in H.VARIANTS:
            for dtype in ("bf16", "fp32"):
                cfg = H.load_trainer_config(H.trainer_overrides(str(tmp_path), engine=engine, variant=variant,
                                                                dtype=dtype))
                assert (cfg.rollout.engine, cfg.model.dtype, cfg.max_steps) == (engine, dtype, 1)
                assert cfg.rollout.check_weight_sync and cfg.parallel.backend == "auto"
                assert cfg.num_responses_per_step == cfg.train.mini_batch_size == 64
    assert H.load_trainer_config(H.trainer_overrides(str(tmp_path), variant="gae_critic")).has_critic
    full = H.load_trainer_config(H.trainer_overrides(str(tmp_path), variant="kl_penalty_full"))
    assert full.kl_penalty == "full" and full.has_reference


def test_step_problems_and_differences():
    good = {"step": 1, "actor/skipped_updates": 0.0, "rollout/logprob_abs_diff": 1e-3, "actor/pg_loss": 0.1}
    assert H.step_problems([good], steps=1, logprob_bound=2e-2) == []
    bad = dict(good, **{"actor/pg_loss": float("nan"), "rollout/logprob_abs_diff": 0.5})
    problems = H.step_problems([bad], steps=2, logprob_bound=2e-2, critic=True)
    assert any("expected 1..2" in p for p in problems) and any("not finite" in p for p in problems)
    assert any("critic/skipped_updates" in p for p in problems) and any("0.5 > 0.02" in p for p in problems)
    assert H.differences({"a": 1.0, "b": "x"}, {"a": 1.0 + 1e-9, "b": "x"}, rel=1e-6, abs_=0) == []
    assert H.differences({"a": 1.0}, {"a": 1.1, "c": 2}, rel=1e-6, abs_=0) == ["a: 1.0 vs 1.1", "c: None vs 2"]
    assert H.comparable({"time/x": 1, "perf/y": 2, "k": 3}) == {"k": 3}


def test_host_sync_summary():
    rec = [types.SimpleNamespace(message="called a synchronizing CUDA operation", filename=f, lineno=n)
           for f, n in [("/x/liteppo_mcore/update/updater.py", 10)] * 3 + [("/y/torch/nn/f.py", 5)]]
    rec.append(types.SimpleNamespace(message="something else", filename="/z.py", lineno=1))
    summary = H.summarize_sync_warnings(rec)
    assert summary["total"] == 4 and summary["distinct_sites"] == 2
    assert summary["sites"][0] == {"site": "liteppo_mcore/update/updater.py:10", "count": 3}


def test_skip_and_require_rules(monkeypatch):
    monkeypatch.delenv(H.REQUIRE_ENV, raising=False)
    monkeypatch.delenv(H.ON_CPU_ENV, raising=False)
    if H.cuda_available():
        pytest.skip("CUDA is present: nothing is missing")
    assert "a CUDA device" in H.missing_requirements()
    marks = H.gpu_marks(cuda_only=True)
    assert [m.name for m in marks] == ["gpu", "skip"] and marks[0].kwargs == {"cuda_only": True}
    assert H.check_required() is None
    monkeypatch.setenv(H.ON_CPU_ENV, "1")  # the CPU rehearsal runs all but the CUDA-only tests
    assert "a CUDA device" not in H.missing_requirements()
    assert "a CUDA device" in H.missing_requirements(cuda_only=True)
    monkeypatch.delenv(H.ON_CPU_ENV)
    monkeypatch.setenv(H.REQUIRE_ENV, "1")  # tools/gpu_check.sh: a missing GPU fails instead of skipping
    assert [m.name for m in H.gpu_marks()] == ["gpu"]
    assert "LITEPPO_REQUIRE_GPU=1" in H.check_required()


def test_reports_are_written_where_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(H.REPORT_ENV, raising=False)
    assert H.write_report("x", {"a": 1}) is None
    monkeypatch.setenv(H.REPORT_ENV, str(tmp_path / "reports"))
    path = H.write_report("trainer hf/kl", {"a": 1})
    assert os.path.basename(path) == "trainer_hf_kl.json" and json.loads(open(path).read()) == {"a": 1}


def test_summaries_of_a_full_run(tmp_path):
    """summarize() over made-up results of every step: headlines, a failed rollout row fails its step."""
    train = {"seq_len": 4096, "rows": [
        {"case": "megatron mb 2", "kind": "baseline", "median_s": 2.0, "tokens_per_s": 1.0, "mfu": 0.4},
        {"case": "ours, micro-batch 2", "kind": "ours", "micro_batch": 2, "max_tokens": None, "median_s": 1.9,
         "tokens_per_s": 1.05, "mfu": 0.42, "ratio_tokens_per_s": 1.05},
        {"case": "ours, <= 2 x seq tokens/mb", "kind": "ours", "micro_batch": None, "max_tokens": 8192,
         "median_s": 1.8, "tokens_per_s": 1.1, "mfu": 0.44, "ratio_tokens_per_s": 1.1},
        {"case": "ours, micro-batch 2 + optimizer offload", "kind": "ours + offload", "micro_batch": 2,
         "max_tokens": None, "median_s": 2.2, "tokens_per_s": 0.9, "mfu": 0.36, "ratio_tokens_per_s": 0.86}]}
    logprob = {"memory_floor_ms": 3.5, "rows": [
        {"version": "naive", "median_ms": 80.0, "time_ratio_vs_naive": 1.0},
        {"version": "ours (x)", "median_ms": 30.0, "time_ratio_vs_naive": 0.375}]}
    rollout = {"rows": [{"engine": "transformers generate", "batch": 64, "tokens_per_s": 1000.0},
                        {"engine": "megatron-core StaticInferenceEngine", "batch": 64, "error": "RuntimeError: x"},
                        {"engine": "ours: fast engine", "batch": 64, "tokens_per_s": 20000.0,
                         "ratio_vs_transformers": 20.0}]}
    sync = {"target_s": 0.5, "rows": [{"case": "export + hf load, bucket 256 MiB", "kind": "export + hf load",
                                       "median_s": 0.02, "gb_per_s": 150.0, "time_vs_state_dict_copy": 7.0}]}
    for name, data in (("bench_train_step", train), ("bench_logprob", logprob), ("bench_rollout", rollout),
                       ("bench_weight_sync", sync)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        R.add_step(str(tmp_path), {"name": name, "status": "ok", "seconds": 1.0, "budget": 60,
                                   "result": f"{name}.json"})
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "host_syncs.json").write_text(json.dumps({"total": 17}))
    (tmp_path / "reports" / "trainer_hf_no_kl.json").write_text(json.dumps({"logprob_abs_diff": [2e-3]}))
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.gpu.t" name="a"/><testcase classname="tests.gpu.t" name="b"><failure/></testcase>'
        '<testcase classname="tests.gpu.t" name="c"/></testsuite></testsuites>')
    R.add_step(str(tmp_path), {"name": "tests", "status": "failed", "seconds": 50.0, "budget": 110})
    result = R.summarize(str(tmp_path), "full", {"budget_s": 300})
    steps = {s["name"]: s for s in result["steps"]}
    assert result["passed"] is False and result["budget_s"] == 300
    assert steps["bench_train_step"]["headline"].startswith("ours/stock tokens/s: mb2 1.05x, <=2seq 1.10x, "
                                                            "mb2+offload/mb2 0.86x; best MFU 44%")
    assert "30.0 ms (0.38x of naive 80.0 ms)" in steps["bench_logprob"]["headline"]
    assert steps["bench_rollout"]["status"] == "failed" and "1 rows failed" in steps["bench_rollout"]["headline"]
    assert "20.0 ms (150 GB/s" in steps["bench_weight_sync"]["headline"]
    assert steps["tests"]["summary"]["failed"] == ["tests.gpu.t::b"]
    assert steps["tests"]["headline"] == ("2 passed, 1 failed, 0 skipped; host syncs/step 17; "
                                          "max logprob_abs_diff 2.0e-03")
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]["name"] == "bench_train_step"


def test_wheel_lookup_and_unpacking(tmp_path):
    import zipfile

    folder = _wheels(tmp_path, WHEEL_FILES[:2])
    found = R.find_wheels(str(folder))
    assert found["required"]["omegaconf"] == WHEEL_FILES[1] and found["required"]["antlr4-python3-runtime"] is None
    assert R.missing_wheels(found) == ["antlr4-python3-runtime", "math-verify", "latex2sympy2_extended"]
    with zipfile.ZipFile(folder / WHEEL_FILES[1], "w") as z:
        z.writestr("omegaconf/__init__.py", "X = 1\n")
    assert R.unpack_wheels(str(folder), str(tmp_path / "site"), ["omegaconf"]) == [WHEEL_FILES[1]]
    assert (tmp_path / "site" / "omegaconf" / "__init__.py").read_text() == "X = 1\n"
