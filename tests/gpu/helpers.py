"""What the GPU tests share, importable (and unit-tested) without CUDA: when to skip, the configurations
of the trainer runs, the stated bounds, the checks of a run's metrics, the host-sync report, and where
reports go.

- The tests skip without CUDA, megatron-core or omegaconf. `LITEPPO_REQUIRE_GPU=1` (set by
  `tools/gpu_check.sh`) turns every such skip into a failure naming what is missing, so a GPU check
  never passes by skipping.
- `LITEPPO_GPU_TESTS_ON_CPU=1` runs them on the CPU (gloo, fp32 only; the CUDA-only tests, graphs and
  the host-sync count, still skip): a rehearsal of the test code itself on a machine without a GPU,
  best under `LITEPPO_STRICT_DEVICE=1`, where tensors carry their GPU placement. It proves nothing
  about CUDA numerics.
- Each test writes what it measured (differences, counts) as JSON into `LITEPPO_GPU_REPORT_DIR` when set,
  before it asserts, so a failing bound still leaves its numbers.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from liteppo_mcore.config import choices  # torch-free, like this module

if TYPE_CHECKING:
    import torch

REQUIRE_ENV = "LITEPPO_REQUIRE_GPU"
ON_CPU_ENV = "LITEPPO_GPU_TESTS_ON_CPU"
REPORT_ENV = "LITEPPO_GPU_REPORT_DIR"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "tiny_cpu.yaml")
MODULES = ("megatron.core", "omegaconf", "transformers")

# ------------------------------------------------------------------------------------------ stated bounds
# rollout/logprob_abs_diff (mean |engine - trainer| log-prob per response token) of one step. Same
# weights on both sides; in bf16 the two forwards round differently (about 2^-8 relative per op), which
# for these tiny models (logits ~0.1) is ~1e-3 per token: the bound leaves ~10x of room. fp32: 1e-7 in the
# CPU rehearsal (2026-12); on the GPU (TF32 off, torch's default for matmuls) kernels differ by summation
# order only.
LOGPROB_DIFF_BOUND = {"bf16": 2e-2, "fp32": 1e-4}
# forward_per_token / forward_full_kl of a bf16 model against the same weights in fp32 (bf16 weights are
# exact in fp32, so only the bf16 activations differ). The same test in bf16 on the CPU (CPU rehearsal,
# 2026-12) measured max 2.4e-3 / mean 7e-4 (log-prob), 1.7e-4 (entropy), 7e-5 (exact KL, whose mean is
# 9e-3): the bounds leave about 10x.
BF16_LOGP_MAX_ABS = 2.5e-2   # per token, log-prob and entropy
BF16_LOGP_MEAN_ABS = 5e-3    # mean over response tokens
BF16_FULL_KL_MAX_ABS = 1e-3  # per token, exact KL
# Runs that must agree (offload on/off; resumed vs uninterrupted), fp32: they are bitwise equal on the CPU;
# on a GPU, atomic adds in some backward kernels may reorder sums (~1e-7 relative). An offload that lost or
# corrupted the Adam moments moves the weights by ~lr = 1e-3 per step.
SAME_RUN_REL = 1e-4
SAME_RUN_ABS = 1e-6
SAME_WEIGHTS_MAX_ABS = 1e-5
# The fast engine: graph replay vs eager, fp32, per sampled token.
GRAPH_LOGPROB_MAX_ABS = 1e-4


# ------------------------------------------------------------------------------------------ skip / require
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def on_cpu_rehearsal() -> bool:
    """The tests run on the CPU by request (module doc), and there is no GPU."""
    return os.environ.get(ON_CPU_ENV, "").strip().lower() in ("1", "true", "yes") and not cuda_available()


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def missing_requirements(*, cuda_only: bool = False) -> list[str]:
    """What these tests need and this machine lacks (empty: run). `cuda_only`: the test needs a real
    GPU even in the CPU rehearsal (CUDA graphs, host-sync counting)."""
    missing = []
    if not cuda_available() and (cuda_only or not on_cpu_rehearsal()):
        missing.append("a CUDA device")
    missing += [name for name in MODULES if not _importable(name)]
    return missing


def skip_reason(missing: Sequence[str]) -> str:
    return f"needs {', '.join(missing)} (the GPU tests: run tools/gpu_check.sh on a GPU machine)"


def gpu_marks(*, cuda_only: bool = False) -> list:
    """`pytestmark` of a GPU test module: marked `gpu`, skipped when something is missing, except under
    LITEPPO_REQUIRE_GPU=1, where the conftest fails each test instead (see `check_required`)."""
    import pytest

    missing = missing_requirements(cuda_only=cuda_only)
    marks = [pytest.mark.gpu(cuda_only=True) if cuda_only else pytest.mark.gpu]
    if missing and not required():
        marks.append(pytest.mark.skip(reason=skip_reason(missing)))
    return marks


def check_required(*, cuda_only: bool = False) -> str | None:
    """The failure message when LITEPPO_REQUIRE_GPU=1 and something is missing, else None."""
    missing = missing_requirements(cuda_only=cuda_only)
    if missing and required():
        return f"{REQUIRE_ENV}=1, but this machine lacks {', '.join(missing)}"
    return None


def dtypes() -> list[str]:
    """bf16 and fp32 on a GPU; fp32 only on the CPU (megatron's bf16 optimizer refuses CPU parameters).
    A subset of config.choices.EXPLICIT_DTYPES on purpose: fp16 is not part of the GPU check."""
    return ["bf16", "fp32"] if cuda_available() else ["fp32"]


def attention_backends() -> list[str]:
    """Every explicit model.attention_backend (sdpa, local, te), te only where Transformer Engine imports."""
    return [b for b in choices.EXPLICIT_ATTENTION_BACKENDS if b != "te" or _importable("transformer_engine")]


# ------------------------------------------------------------------------------------------ trainer runs
# A subset of config.choices.EXPLICIT_ROLLOUT_ENGINES on purpose: sglang needs SGLang installed and its
# own server processes, so the trainer matrix leaves it out.
ENGINES = ("hf", "fast", "mcore")
# The algorithm variants of the trainer matrix (on top of tiny_cpu.yaml's LitePPO: no KL, no critic).
VARIANTS: dict[str, list[str]] = {
    "no_kl": [],
    "kl_loss": ["use_kl_loss=true", "kl_loss_type=k3", "kl_loss_coef=0.01"],
    "gae_critic": ["adv_estimator=gae", "critic.lr=1e-3"],
    "kl_penalty_full": ["add_token_level_kl=true", "kl_penalty=full"],
}


def trainer_overrides(run_dir: str, *, engine: str = "hf", variant: str = "no_kl", dtype: str = "bf16",
                      steps: int = 1, save_interval: int = 0, extra: Iterable[str] = ()) -> list[str]:
    """A tiny one-process run of examples/tiny_cpu.yaml (8 prompts x 8 responses, one optimizer update per
    step), on the GPU when there is one, with the engine's weights checked after every sync."""
    return [
        f"output_dir={run_dir}", f"max_steps={steps}", "parallel.backend=auto", f"model.dtype={dtype}",
        "rollout_batch_size=8", "train.mini_batch_size=64", "train.micro_batch_size=32",
        f"rollout.engine={engine}", "rollout.check_weight_sync=true",
        "eval.enabled=false", f"checkpoint.save_interval={save_interval}", "checkpoint.save_on_signal=false",
        "logging.tensorboard=false", "logging.plot=false", "logging.log_interval=1",
        "reward.num_workers=1", *VARIANTS[variant], *extra]


def load_trainer_config(overrides: Sequence[str]):
    from liteppo_mcore.config import load_config

    return load_config(CONFIG, list(overrides), world_size=1)


def comparable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row without its timings (which never repeat)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}


def step_problems(rows: Sequence[Mapping[str, Any]], *, steps: int, logprob_bound: float,
                  critic: bool = False) -> list[str]:
    """What is wrong with a run's metrics rows (empty: nothing): the steps 1..steps each once, every
    number finite, no skipped update (actor, and critic with a critic), the engine-vs-trainer log-prob
    difference present and under `logprob_bound`."""
    problems = []
    trained = [r for r in rows if r.get("step", 0) > 0]
    if [r.get("step") for r in trained] != list(range(1, steps + 1)):
        problems.append(f"steps {[r.get('step') for r in trained]}, expected 1..{steps}")
    for row in trained:
        step = row.get("step")
        bad = sorted(k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v))
        if bad:
            problems.append(f"step {step}: not finite: {bad}")
        for kind in ("actor",) + (("critic",) if critic else ()):
            skipped = row.get(f"{kind}/skipped_updates")
            if skipped != 0:
                problems.append(f"step {step}: {kind}/skipped_updates = {skipped}")
        diff = row.get("rollout/logprob_abs_diff")
        if diff is None:
            problems.append(f"step {step}: no rollout/logprob_abs_diff")
        elif not diff <= logprob_bound:
            problems.append(f"step {step}: rollout/logprob_abs_diff {diff:.3g} > {logprob_bound:g}")
    return problems


def differences(a: Mapping[str, Any], b: Mapping[str, Any], *, rel: float, abs_: float) -> list[str]:
    """Keys whose values differ between two comparable rows beyond rel/abs (or exist in only one)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if not math.isclose(x, y, rel_tol=rel, abs_tol=abs_) and not (math.isnan(x) and math.isnan(y)):
                out.append(f"{key}: {x!r} vs {y!r}")
        elif x != y:
            out.append(f"{key}: {x!r} vs {y!r}")
    return out


# ------------------------------------------------------------------------------------------ host syncs
_SYNC_WARNING = re.compile(r"synchroniz", re.IGNORECASE)


def summarize_sync_warnings(records: Iterable[Any], *, top: int = 40) -> dict[str, Any]:
    """The host synchronisations `torch.cuda.set_sync_debug_mode("warn")` reported (warning records, as
    `warnings.catch_warnings(record=True)` gives them): the total, and the call sites by count."""
    sites: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    total = 0
    for rec in records:
        text = str(getattr(rec, "message", rec))
        if not _SYNC_WARNING.search(text):
            continue
        total += 1
        sites[f"{_short_path(getattr(rec, 'filename', '?'))}:{getattr(rec, 'lineno', 0)}"] += 1
        kinds[text.splitlines()[0][:120]] += 1
    return {"total": total, "sites": [{"site": s, "count": c} for s, c in sites.most_common(top)],
            "distinct_sites": len(sites), "messages": dict(kinds.most_common(10))}


def _short_path(path: str) -> str:
    parts = str(path).split(os.sep)
    for anchor in ("liteppo_mcore", "megatron", "torch", "transformers", "tests"):
        if anchor in parts:
            return os.sep.join(parts[parts.index(anchor):])
    return os.sep.join(parts[-3:])


# ------------------------------------------------------------------------------------------ reports
def report_dir() -> str | None:
    path = os.environ.get(REPORT_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
    return path or None


def write_report(name: str, data: Any) -> str | None:
    """Write `data` as JSON to LITEPPO_GPU_REPORT_DIR/<name>.json (nothing when unset); the path."""
    where = report_dir()
    if where is None:
        return None
    path = os.path.join(where, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    return path


def run_trainer(overrides: Sequence[str], *, inspect=None, train_steps: int | None = None):
    """Run the trainer in this process (the session's process group must exist). Without `train_steps`:
    `fit()`, which also saves a checkpoint at the end, and the rows of its metrics.jsonl; with it: that
    many `train_step()` calls and nothing else (no checkpoint, no file), and their metrics as rows.
    Returns (rows, `inspect(trainer)` called before the trainer is closed)."""
    from liteppo_mcore.parallel.mcore import destroy_model_parallel
    from liteppo_mcore.trainer.loop import Trainer
    from liteppo_mcore.utils.sinks import read_metrics

    cfg = load_trainer_config(overrides)
    try:
        trainer = Trainer(cfg)
    except BaseException:
        destroy_model_parallel()  # the next run must be able to build its groups again
        raise
    rows: list[dict[str, Any]] = []
    try:
        if train_steps is None:
            trainer.fit()
        else:
            for _ in range(train_steps):
                result = trainer.train_step(trainer.step + 1)
                trainer.step += 1
                rows.append({"step": trainer.step, **result.metrics})
        extra = inspect(trainer) if inspect is not None else None
    finally:
        trainer.close()
    if train_steps is None:
        path = os.path.join(cfg.output_dir, "metrics.jsonl")
        rows = read_metrics(path) if os.path.exists(path) else []
    return rows, extra


def flat_parameters(*modules) -> torch.Tensor:
    """Every parameter of `modules`, in order, as one float64 host vector (for run-to-run comparisons)."""
    import torch

    return torch.cat([p.detach().double().cpu().flatten() for m in modules if m is not None
                      for p in m.parameters()])
