"""Every validation rule of the configuration, run at load time before any process group exists.

Each problem becomes one message that names the key path, the value, the rule and a fix. All problems
are collected and reported together, so a user fixes a file in one pass. Validation never rewrites a
value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from liteppo_mcore.config import schema
from liteppo_mcore.config.choices import (
    ADV_ESTIMATORS,
    ATTENTION_BACKENDS,
    DATA_FORMATS,
    DTYPES,
    KL_ESTIMATORS,
    KL_PENALTIES,
    LOSS_AGG_MODES,
    LR_SCHEDULES,
    MODEL_FAMILIES,
    OPTIMIZERS,
    PARALLEL_BACKENDS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    REWARD_NORMS,
    ROLLOUT_ENGINES,
    ROLLOUT_IS_LEVELS,
    ROLLOUT_MODES,
)


class ConfigError(ValueError):
    """A configuration that cannot run. `problems` holds one message per broken rule."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        head = "invalid configuration" if len(self.problems) == 1 else f"{len(self.problems)} configuration problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def fmt(value: Any) -> str:
    """A value as the user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, value: Any, rule: str, fix: str) -> None:
        self.problems.append(f"{key}={fmt(value)}: {rule}. {fix}")

    def choice(self, key: str, value: Any, allowed: Iterable[Any]) -> None:
        allowed = tuple(allowed)
        if value not in allowed:
            names = ", ".join(fmt(a) for a in allowed)
            self.fail(key, value, f"must be one of {names}", f"Set {key} to one of them.")

    def positive(self, key: str, value: Any, *, allow_none: bool = False, integer: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            kind = "a positive integer" if integer else "a positive number"
            extra = " or null" if allow_none else ""
            self.fail(key, value, f"must be {kind}{extra}", f"Set {key} to {kind}{extra}.")

    def non_negative(self, key: str, value: Any) -> None:
        if value is None or value < 0:
            self.fail(key, value, "must be >= 0", f"Set {key} to 0 or more.")

    def unit_interval(self, key: str, value: float, *, open_low: bool = False) -> None:
        low_ok = value > 0 if open_low else value >= 0
        if not (low_ok and value <= 1):
            rng = "(0, 1]" if open_low else "[0, 1]"
            self.fail(key, value, f"must be in {rng}", f"Set {key} to a value in {rng}.")


def validate(cfg: schema.LitePPOConfig, world_size: int = 1) -> None:
    """Raise ConfigError listing every broken rule of `cfg` for a job of `world_size` processes."""
    c = _Checker()
    _check_algorithm(c, cfg)
    _check_model(c, cfg.model, cfg.parallel)
    dp = _check_parallel(c, cfg.parallel, world_size)
    _check_batches(c, cfg, dp)
    _check_sections(c, cfg)
    if c.problems:
        raise ConfigError(c.problems)


def _check_algorithm(c: _Checker, cfg: schema.LitePPOConfig) -> None:
    c.choice("reward_norm", cfg.reward_norm, REWARD_NORMS)
    c.choice("adv_estimator", cfg.adv_estimator, ADV_ESTIMATORS)
    c.choice("loss_agg_mode", cfg.loss_agg_mode, LOSS_AGG_MODES)
    c.choice("kl_penalty", cfg.kl_penalty, KL_PENALTIES)
    if cfg.kl_penalty == "full" and cfg.has_reference and cfg.parallel.pp > 1:
        c.fail("kl_penalty", "full", f"needs parallel.pp=1 (got {cfg.parallel.pp}): the exact KL needs the policy's "
               "and the reference's logits at the same positions at once",
               "Set kl_penalty: k3 (or kl), or parallel.pp: 1.")
    c.choice("kl_loss_type", cfg.kl_loss_type, KL_ESTIMATORS)
    c.choice("rollout_is", cfg.rollout_is, ROLLOUT_IS_LEVELS)
    if cfg.rollout_is_threshold is None or not cfg.rollout_is_threshold >= 1:
        c.fail("rollout_is_threshold", cfg.rollout_is_threshold,
               "must be >= 1 (the importance weight is truncated at it; below 1 every token's weight would shrink)",
               "Set rollout_is_threshold: 2.0.")
    for key in ("rollout_batch_size", "prompt_length", "response_length", "num_return_sequences_in_group",
                "ppo_epochs", "kl_horizon", "max_steps",
                "filter_groups_max_rounds"):
        c.positive(key, getattr(cfg, key))
    for key in ("reward_clip", "advantage_clip", "value_clip", "target_kl"):
        c.positive(key, getattr(cfg, key), allow_none=True, integer=False)
    c.positive("pg_clip", cfg.pg_clip, integer=False)
    c.positive("pg_clip_high", cfg.pg_clip_high, allow_none=True, integer=False)
    if cfg.pg_clip_low is not None and not 0 < cfg.pg_clip_low < 1:
        c.fail("pg_clip_low", cfg.pg_clip_low, "must be in (0, 1) or null (the ratio's lower bound is 1 - pg_clip_low)",
               "Set pg_clip_low: 0.2, or null to use pg_clip.")
    for key in ("kl_loss_coef", "init_kl_coef", "entropy_coef"):
        c.non_negative(key, getattr(cfg, key))
    c.unit_interval("gamma", cfg.gamma)
    c.unit_interval("lambd", cfg.lambd)
    if cfg.dual_clip_ratio is None or cfg.dual_clip_ratio <= 1:
        c.fail("dual_clip_ratio", cfg.dual_clip_ratio, "must be > 1 (the dual clip bounds the loss at -c*A for A < 0)",
               "Set dual_clip_ratio: 3.0, or dual_clip_loss: false to turn the dual clip off.")
    if not cfg.output_dir:
        c.fail("output_dir", cfg.output_dir, "must name a directory", "Set output_dir: outputs/my_run.")

    n = cfg.num_return_sequences_in_group
    if cfg.reward_norm == "group" and n is not None and n < 2:
        c.fail("num_return_sequences_in_group", n,
               "reward_norm=group needs num_return_sequences_in_group >= 2: with one response per prompt "
               "every normalized reward is 0",
               "Set num_return_sequences_in_group: 8, or reward_norm: batch.")
    for key, needs in (("adv_estimator", cfg.adv_estimator == "rloo"), ("filter_groups", cfg.filter_groups)):
        if needs and n is not None and n < 2:
            value = getattr(cfg, key)
            c.fail("num_return_sequences_in_group", n,
                   f"{key}={fmt(value)} needs num_return_sequences_in_group >= 2: "
                   + ("the leave-one-out baseline is the mean of the other responses of the group" if key ==
                      "adv_estimator" else "a group of one response never has rewards that differ"),
                   "Set num_return_sequences_in_group: 8.")
    if cfg.critic.load and not cfg.has_critic:
        c.fail("critic.load", cfg.critic.load, f"only adv_estimator=gae has a critic (here: {cfg.adv_estimator})",
               "Remove critic.load, or set adv_estimator: gae.")
    if cfg.adv_estimator == "grpo" and cfg.reward_norm != "group":
        c.fail("reward_norm", cfg.reward_norm,
               "adv_estimator=grpo needs reward_norm=group (its advantage is the group-normalized reward)",
               "Set reward_norm: group, or adv_estimator: reinforce.")
    if cfg.reward_shift and cfg.reward_scale:
        c.fail("reward_scale", cfg.reward_scale,
               "reward_shift and reward_scale are exclusive (shift = centre only, scale = divide only; "
               "both is the default normalization)",
               "Set both to false for (r - mean) / std, or keep only one of them.")


def _check_model(c: _Checker, m: schema.ModelConfig, p: schema.ParallelConfig) -> None:
    c.choice("model.family", m.family, MODEL_FAMILIES)
    c.choice("model.dtype", m.dtype, DTYPES)
    c.choice("model.attention_backend", m.attention_backend, ATTENTION_BACKENDS)
    c.choice("model.recompute_granularity", m.recompute_granularity, RECOMPUTE_GRANULARITIES)
    c.choice("model.recompute_method", m.recompute_method, RECOMPUTE_METHODS)
    c.positive("model.recompute_num_layers", m.recompute_num_layers)
    c.positive("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by)
    c.positive("model.vocab_size", m.vocab_size, allow_none=True)
    c.positive("model.max_position_embeddings", m.max_position_embeddings)
    c.positive("model.rope_theta", m.rope_theta, integer=False)
    c.positive("model.norm_epsilon", m.norm_epsilon, integer=False)
    c.positive("model.init_std", m.init_std, integer=False)
    if m.hf_path is not None:
        return  # shapes come from config.json, checked when the model is built
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        c.positive(f"model.{key}", getattr(m, key))
    heads, groups = m.num_attention_heads, m.num_query_groups
    if heads and groups and heads > 0 and groups > 0:
        if heads % groups:
            c.fail("model.num_query_groups", groups, f"must divide model.num_attention_heads ({heads})",
                   "Pick a number of key/value heads that divides the query heads.")
        if m.hidden_size and m.hidden_size % heads:
            c.fail("model.hidden_size", m.hidden_size, f"must be a multiple of model.num_attention_heads ({heads})",
                   "Change hidden_size or num_attention_heads.")
        if p.tp and p.tp > 0:
            if heads % p.tp:
                c.fail("parallel.tp", p.tp, f"must divide model.num_attention_heads ({heads})",
                       "Pick a tp that divides the number of query heads.")
            if groups % p.tp:
                c.fail("parallel.tp", p.tp, f"must divide model.num_query_groups ({groups})",
                       "Pick a tp that divides the number of key/value heads.")
    if p.pp and p.pp > 0 and m.num_layers and m.num_layers > 0 and m.num_layers % p.pp:
        c.fail("parallel.pp", p.pp, f"must divide model.num_layers ({m.num_layers})",
               "Pick a pp that divides the number of layers.")


def _check_parallel(c: _Checker, p: schema.ParallelConfig, world_size: int) -> int | None:
    """Check the layout; return dp, or None when the layout itself is broken."""
    c.choice("parallel.backend", p.backend, PARALLEL_BACKENDS)
    c.positive("parallel.timeout_minutes", p.timeout_minutes, integer=False)
    ok = True
    for key in ("tp", "pp", "cp"):
        value = getattr(p, key)
        if value is None or value < 1:
            c.fail(f"parallel.{key}", value, "must be a positive integer", f"Set parallel.{key}: 1 or more.")
            ok = False
    if p.sequence_parallel and ok and p.tp < 2:
        c.fail("parallel.sequence_parallel", True, f"needs parallel.tp >= 2 (got {p.tp})",
               "Set parallel.sequence_parallel: false, or raise parallel.tp.")
    if not ok:
        return None
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        c.problems.append(
            f"parallel: tp({p.tp}) * pp({p.pp}) * cp({p.cp}) = {model_parallel} does not divide "
            f"WORLD_SIZE({world_size}). Launch a multiple of {model_parallel} processes, or change "
            "parallel.tp/pp/cp.")
        return None
    return world_size // model_parallel


def _check_batches(c: _Checker, cfg: schema.LitePPOConfig, dp: int | None) -> None:
    t = cfg.train
    c.positive("train.mini_batch_size", t.mini_batch_size)
    c.positive("train.micro_batch_size", t.micro_batch_size)
    c.positive("train.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch, allow_none=True)
    B, n, mini, micro = cfg.rollout_batch_size, cfg.num_return_sequences_in_group, t.mini_batch_size, t.micro_batch_size
    if not all(isinstance(v, int) and v > 0 for v in (B, n, mini, micro)):
        return
    total = B * n
    if total % mini:
        c.fail("train.mini_batch_size", mini,
               f"must divide rollout_batch_size * num_return_sequences_in_group = {B} * {n} = {total} responses",
               "Pick a mini_batch_size that divides the responses of a step (e.g. a power of two).")
    if cfg.model.attention_backend == "local" and t.pack_sequences:
        c.fail("train.pack_sequences", True, "needs an attention that takes packed sequences: megatron's local "
               "DotProductAttention (model.attention_backend=local) does not",
               "Set model.attention_backend: sdpa (or te, or auto), or train.pack_sequences: false.")
    longest = cfg.prompt_length + cfg.response_length
    if t.max_tokens_per_micro_batch is not None and t.max_tokens_per_micro_batch < longest:
        c.fail("train.max_tokens_per_micro_batch", t.max_tokens_per_micro_batch,
               f"must hold one whole sequence of prompt_length + response_length = "
               f"{cfg.prompt_length + cfg.response_length} tokens",
               "Raise it, or set it to null.")
    if dp is None:
        return
    if B % dp:
        c.fail("rollout_batch_size", B, f"must be divisible by the data-parallel size dp={dp} "
               "(each DP rank generates whole groups for rollout_batch_size/dp prompts)",
               f"Set rollout_batch_size to a multiple of {dp}, or change the world size or parallel layout.")
    if mini % dp:
        c.fail("train.mini_batch_size", mini, f"must be divisible by the data-parallel size dp={dp} "
               "(each DP rank takes an equal share of every mini-batch)",
               f"Set train.mini_batch_size to a multiple of {dp}.")


def _check_sections(c: _Checker, cfg: schema.LitePPOConfig) -> None:
    t, r, d = cfg.train, cfg.rollout, cfg.data
    c.choice("train.optimizer", t.optimizer, OPTIMIZERS)
    c.choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.use_distributed_optimizer and t.optimizer == "sgd":
        c.fail("train.use_distributed_optimizer", True, "works with train.optimizer adam or adamw only "
               "(megatron's distributed optimizer shards Adam states)",
               "Set train.optimizer: adamw, or train.use_distributed_optimizer: false.")
    c.non_negative("train.lr", t.lr)
    c.non_negative("train.min_lr", t.min_lr)
    if t.min_lr is not None and t.lr is not None and t.min_lr > t.lr:
        c.fail("train.min_lr", t.min_lr, f"must not exceed train.lr ({fmt(t.lr)})", "Lower train.min_lr.")
    c.non_negative("train.lr_warmup_steps", t.lr_warmup_steps)
    c.non_negative("train.weight_decay", t.weight_decay)
    c.non_negative("train.clip_grad", t.clip_grad)
    for key in ("adam_beta1", "adam_beta2"):
        value = getattr(t, key)
        if not (0 <= value < 1):
            c.fail(f"train.{key}", value, "must be in [0, 1)", f"Set train.{key} to e.g. 0.9.")
    c.positive("train.adam_eps", t.adam_eps, integer=False)

    c.choice("rollout.engine", r.engine, ROLLOUT_ENGINES)
    c.choice("rollout.mode", r.mode, ROLLOUT_MODES)
    c.positive("rollout.temperature", r.temperature, integer=False)
    c.unit_interval("rollout.top_p", r.top_p, open_low=True)
    if r.top_k == 0 or r.top_k < -1:
        c.fail("rollout.top_k", r.top_k, "must be -1 (disabled) or a positive integer", "Set rollout.top_k: -1.")
    c.positive("rollout.tp", r.tp)
    c.positive("rollout.weight_sync_bucket_mb", r.weight_sync_bucket_mb)
    c.positive("rollout.max_batch_size", r.max_batch_size, allow_none=True)
    c.unit_interval("rollout.mem_fraction_static", r.mem_fraction_static, open_low=True)
    for key in ("request_timeout_s", "server_start_timeout_s"):
        c.positive(f"rollout.{key}", getattr(r, key), integer=False)
    c.non_negative("rollout.max_retries", r.max_retries)
    # A SLURM script that starts the servers itself hands their URLs over in LITEPPO_SGLANG_URLS.
    if (r.mode == "disaggregated" and r.engine in ("sglang", "auto") and not r.server_urls
            and not os.environ.get("LITEPPO_SGLANG_URLS")):
        c.fail("rollout.server_urls", "[]", "rollout.mode=disaggregated needs the URLs of running SGLang servers",
               "Set rollout.server_urls: [http://host:30000, ...] (or the LITEPPO_SGLANG_URLS environment "
               "variable), or rollout.mode: colocated.")

    c.choice("data.format", d.format, DATA_FORMATS)
    for key in ("prompt_key", "answer_key"):
        if not getattr(d, key):
            c.fail(f"data.{key}", getattr(d, key), "must name a field", f"Set data.{key} to the field's name.")

    c.positive("reward.timeout_s", cfg.reward.timeout_s, integer=False)
    c.positive("reward.num_workers", cfg.reward.num_workers)
    if not cfg.reward.name:
        c.fail("reward.name", cfg.reward.name, "must name a reward function",
               "Set reward.name: math, a built-in task's reward, module:function or path/to/file.py:function.")
    c.non_negative("critic.lr", cfg.critic.lr)
    c.non_negative("critic.weight_decay", cfg.critic.weight_decay)
    c.non_negative("train.max_consecutive_bad_steps", cfg.train.max_consecutive_bad_steps)
    c.non_negative("checkpoint.save_interval", cfg.checkpoint.save_interval)
    c.positive("checkpoint.num_to_keep", cfg.checkpoint.num_to_keep, allow_none=True)
    c.positive("logging.log_interval", cfg.logging.log_interval)
    c.non_negative("logging.num_sample_completions", cfg.logging.num_sample_completions)
    c.positive("logging.peak_tflops", cfg.logging.peak_tflops, allow_none=True, integer=False)
    c.non_negative("eval.interval", cfg.eval.interval)
    c.positive("eval.num_samples", cfg.eval.num_samples)
    c.positive("eval.max_prompts", cfg.eval.max_prompts, allow_none=True)


def output_dir_problem(path: str) -> str | None:
    """Why `output_dir` cannot hold a run (a file, under a file, not writable), or None. Checked before
    any process group exists, so the run (and the dry run) stops at once with the path and the reason
    instead of failing seconds later inside the trainer."""
    import os

    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{target} is a file, not a directory"
    probe = target
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{target} would be under {probe}, which is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable" + ("" if probe == target else f" (so {target} cannot be created)")
    return None
