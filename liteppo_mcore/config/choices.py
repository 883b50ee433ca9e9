"""The one list of allowed values of every configuration key that takes a fixed set of strings.

Validation (`config.validate`), the maths (`algo`) and the rollout engines (`rollout`) all check values
against these tuples, so adding or removing a value is a change here and nowhere else. The module is
stdlib only, with no torch and no other project import, so that every layer, even one that must stay
torch-free, can import it. The order of each tuple is the order error messages list the values in.

`None` in a tuple is YAML's `null` (the key may be left unset). Where a key also takes `auto`, its
`EXPLICIT_*` tuple holds the values `auto` can resolve to, for the code that does the resolving.
`spoken` writes a tuple the way a message lists it ("auto, jsonl or parquet").
"""

from __future__ import annotations

AUTO = "auto"
"""The value that lets the program pick (see each key's docstring in `config.schema` for how)."""

# --- root keys: the algorithm ---
ADV_ESTIMATORS: tuple[str, ...] = ("gae", "reinforce", "grpo", "rloo", "reinforce_plus_plus")
"""adv_estimator."""
REWARD_NORMS: tuple[str | None, ...] = ("group", "batch", "running", None)
"""reward_norm (None: no normalization)."""
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""loss_agg_mode."""
KL_ESTIMATORS: tuple[str, ...] = ("kl", "abs", "mse", "k3")
"""kl_loss_type: the per-token KL estimates computed from log-probs (`algo.kl_estimate`)."""
KL_PENALTIES: tuple[str, ...] = KL_ESTIMATORS + ("full",)
"""kl_penalty: the per-token estimates, or full (exact, whole vocabulary, computed from the logits)."""
ROLLOUT_IS_LEVELS: tuple[str | None, ...] = ("token", "sequence", None)
"""rollout_is (None: no train-inference importance weight)."""

# --- model ---
MODEL_FAMILIES: tuple[str, ...] = ("qwen2", "qwen3", "llama")
"""model.family."""
EXPLICIT_DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
DTYPES: tuple[str, ...] = (AUTO,) + EXPLICIT_DTYPES
"""model.dtype."""
EXPLICIT_ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "local", "te")
ATTENTION_BACKENDS: tuple[str, ...] = (AUTO,) + EXPLICIT_ATTENTION_BACKENDS
"""model.attention_backend."""
RECOMPUTE_GRANULARITIES: tuple[str | None, ...] = (None, "selective", "full")
"""model.recompute_granularity (None: no activation recompute)."""
RECOMPUTE_METHODS: tuple[str, ...] = ("uniform", "block")
"""model.recompute_method."""

# --- parallel, train ---
EXPLICIT_PARALLEL_BACKENDS: tuple[str, ...] = ("nccl", "gloo")
PARALLEL_BACKENDS: tuple[str, ...] = (AUTO,) + EXPLICIT_PARALLEL_BACKENDS
"""parallel.backend."""
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
"""train.optimizer."""
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""train.lr_schedule."""

# --- rollout, data ---
EXPLICIT_ROLLOUT_ENGINES: tuple[str, ...] = ("mcore", "hf", "fast", "sglang")
ROLLOUT_ENGINES: tuple[str, ...] = (AUTO,) + EXPLICIT_ROLLOUT_ENGINES
"""rollout.engine."""
ROLLOUT_MODES: tuple[str, ...] = ("colocated", "disaggregated")
"""rollout.mode."""
EXPLICIT_DATA_FORMATS: tuple[str, ...] = ("jsonl", "parquet")
DATA_FORMATS: tuple[str, ...] = (AUTO,) + EXPLICIT_DATA_FORMATS
"""data.format."""

CHOICES_BY_KEY: dict[str, tuple[str | None, ...]] = {
    "adv_estimator": ADV_ESTIMATORS,
    "reward_norm": REWARD_NORMS,
    "loss_agg_mode": LOSS_AGG_MODES,
    "kl_penalty": KL_PENALTIES,
    "kl_loss_type": KL_ESTIMATORS,
    "rollout_is": ROLLOUT_IS_LEVELS,
    "model.family": MODEL_FAMILIES,
    "model.dtype": DTYPES,
    "model.attention_backend": ATTENTION_BACKENDS,
    "model.recompute_granularity": RECOMPUTE_GRANULARITIES,
    "model.recompute_method": RECOMPUTE_METHODS,
    "parallel.backend": PARALLEL_BACKENDS,
    "train.optimizer": OPTIMIZERS,
    "train.lr_schedule": LR_SCHEDULES,
    "rollout.engine": ROLLOUT_ENGINES,
    "rollout.mode": ROLLOUT_MODES,
    "data.format": DATA_FORMATS,
}
"""{key path: its allowed values} for every key with a fixed set of values (the tests walk it)."""


def spoken(values: tuple[str, ...]) -> str:
    """The values as a message says them, in their order: ``a``, ``a or b``, ``a, b or c``."""
    return ", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1 else values[0]
