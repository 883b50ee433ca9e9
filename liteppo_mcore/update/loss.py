"""The actor and critic losses of one micro-batch, on this rank's positions (docs/semantics.md section 4).

Each micro-batch returns its SHARE of the mini-batch loss: numerators are local (this rank's
sequences, this CP rank's tokens), denominators are the GLOBAL counts of the optimizer mini-batch
(`Denominators`, reduced before the first micro-batch). megatron runs with
`calculate_per_token_loss=True`, so it neither averages over micro-batches nor over DP: gradients are
summed over micro-batches and DP x CP ranks, which makes one optimizer step's gradient the gradient
of `Agg(...)` over the whole mini-batch, whatever the layout.

Metrics are detached float64 sums over this rank's tokens (or shares of `Agg`), summed over
micro-batches and ranks by the caller, then divided by the global token count: means over tokens,
never averages of rank averages. `maxima` (ACTOR_MAXIMA) are maxima.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from liteppo_mcore.algo import aggregate, kl_estimate, policy_loss, rollout_importance_weight, value_loss
from liteppo_mcore.algo.stats import STAT_DTYPE
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.models.logprob import logprob_entropy_at
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.update.batch import TrainBatch

# Metric sums of one micro-batch, in a fixed order (they travel as one float64 vector).
ACTOR_SUMS = ("loss", "pg_loss", "kl_loss", "entropy_sum", "clipfrac_sum", "clipfrac_low_sum", "clipfrac_high_sum",
              "dual_clipfrac_sum", "approx_kl_k3_sum", "approx_kl_k1_sum", "num_tokens", "rollout_abs_diff_sum",
              "is_weight_sum", "is_truncated_sum")
CRITIC_SUMS = ("loss", "value_loss", "vf_clipfrac_sum", "values_sum", "num_tokens")
# Maxima of one micro-batch, in a fixed order (one float64 vector, max-reduced; 0 is neutral: both positive).
ACTOR_MAXIMA = ("ratio_max", "is_weight_max")


@dataclass(frozen=True)
class LossSettings:
    """The configuration keys the losses read, resolved once."""

    agg_mode: str
    response_length: int
    pg_clip: float
    pg_clip_low: float | None
    pg_clip_high: float | None
    dual_clip_ratio: float | None
    use_kl_loss: bool
    kl_loss_coef: float
    kl_loss_type: str
    entropy_coef: float
    value_clip: float | None
    temperature: float
    rollout_is: str | None = None
    rollout_is_threshold: float = 2.0

    @classmethod
    def from_config(cls, cfg: LitePPOConfig) -> LossSettings:
        return cls(agg_mode=cfg.effective_loss_agg_mode, response_length=cfg.response_length,
                   pg_clip=cfg.pg_clip, pg_clip_low=cfg.pg_clip_low, pg_clip_high=cfg.pg_clip_high,
                   dual_clip_ratio=cfg.dual_clip_ratio if cfg.dual_clip_loss else None,
                   use_kl_loss=cfg.use_kl_loss, kl_loss_coef=cfg.kl_loss_coef, kl_loss_type=cfg.kl_loss_type,
                   entropy_coef=cfg.entropy_coef, value_clip=cfg.value_clip, temperature=cfg.rollout.temperature,
                   rollout_is=cfg.rollout_is, rollout_is_threshold=cfg.rollout_is_threshold)


@dataclass(frozen=True)
class Denominators:
    """Global counts of one optimizer mini-batch: valid tokens and sequences with a valid token."""

    num_tokens: Tensor
    num_seqs: Tensor


def _agg(x: Tensor, micro_batch: dict[str, Tensor], settings: LossSettings, counts: Denominators) -> Tensor:
    return aggregate(x, micro_batch["mask"], mode=settings.agg_mode, num_tokens=counts.num_tokens,
                     num_seqs=counts.num_seqs, response_length=settings.response_length,
                     seq_token_counts=micro_batch["seq_token_counts"])


@torch.no_grad()
def _sums(names: tuple[str, ...], values: dict[str, Tensor]) -> Tensor:
    """The 0-d `values` named by `names`, detached, as one float64 vector (one stack, promoting the dtypes)."""
    return torch.stack([values[k] for k in names]).to(STAT_DTYPE)


def actor_loss(output: Tensor, micro_batch: dict[str, Tensor], settings: LossSettings, counts: Denominators,
               groups: ParallelGroups, vocab_size: int, weight: Tensor | None = None
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Policy loss (+ KL loss, - entropy bonus) share of one micro-batch from the actor's last hidden
    states `[b, S/cp, H]` and output weight `weight [V/tp, H]` (the trainer's path: the logits are never
    whole), or, without `weight`, from its logits `[b, S/cp, V/tp]`. `counts`: the mini-batch's global
    token and sequence counts the aggregation divides by. Returns the loss to back-propagate and
    {"sums": [ACTOR_SUMS], "maxima": [ACTOR_MAXIMA]}.

    With `rollout_is`, each token's policy-gradient term is multiplied by the truncated importance
    weight of the old policy over the engine's (`rollout_importance_weight`): its log is the
    micro-batch's `is_log_weight` when the update computed it from a separate old-log-prob pass
    (`rollout_is_log_weights`), else, with one update per step, this pass's detached log-probs minus
    `rollout_logp`, token by token."""
    mask = micro_batch["mask"]
    v_local = output.shape[-1] if weight is None else weight.shape[0]
    logp, entropy = logprob_entropy_at(
        output, micro_batch["labels"], mask, weight=weight, tp_group=groups.tp_group,
        temperature=settings.temperature, vocab_start=groups.tp_rank * v_local, vocab_size=vocab_size,
        compute_entropy=True, entropy_grad=settings.entropy_coef != 0.0)
    assert entropy is not None  # compute_entropy=True
    # One optimizer update per step: the update's own detached log-probs are old_logp (ratio 1).
    old_logp = micro_batch["old_logp"] if "old_logp" in micro_batch else logp.detach()
    pg, pg_stats = policy_loss(logp, old_logp, micro_batch["advantages"], mask, clip=settings.pg_clip,
                               clip_low=settings.pg_clip_low, clip_high=settings.pg_clip_high,
                               dual_clip_ratio=settings.dual_clip_ratio)
    zero = pg.new_zeros(())  # the sums of terms that are off (on the loss's device: they are stacked with the rest)
    is_stats = {"is_weight_sum": zero, "is_truncated_sum": zero, "is_weight_max": zero}
    if settings.rollout_is is not None:
        log_weight = (micro_batch["is_log_weight"] if "is_log_weight" in micro_batch
                      else old_logp - micro_batch["rollout_logp"])
        weight, is_stats = rollout_importance_weight(log_weight, mask, threshold=settings.rollout_is_threshold)
        pg = pg * weight
    pg_loss = _agg(pg, micro_batch, settings, counts)
    loss = pg_loss
    kl_loss = zero
    if settings.use_kl_loss:
        kl = kl_estimate(logp, micro_batch["ref_logp"], settings.kl_loss_type)
        kl_loss = _agg(kl, micro_batch, settings, counts)
        loss = loss + settings.kl_loss_coef * kl_loss
    if settings.entropy_coef != 0.0:
        loss = loss - settings.entropy_coef * _agg(entropy, micro_batch, settings, counts)
    entropy_sum = torch.where(mask, entropy.detach(), 0.0).sum()
    # With old_logp skipped, this pass's log-probs are the trainer's side of rollout/logprob_abs_diff.
    diff_sum = (torch.where(mask, (logp.detach() - micro_batch["rollout_logp"]).abs(), 0.0).sum()
                if "rollout_logp" in micro_batch and "old_logp" not in micro_batch else zero)
    sums = _sums(ACTOR_SUMS, {"loss": loss, "pg_loss": pg_loss, "kl_loss": kl_loss, "entropy_sum": entropy_sum,
                              "rollout_abs_diff_sum": diff_sum, **pg_stats, **is_stats})
    maxima = _sums(ACTOR_MAXIMA, {"ratio_max": pg_stats["ratio_max"], "is_weight_max": is_stats["is_weight_max"]})
    return loss, {"sums": sums, "maxima": maxima}


def rollout_is_log_weights(batch: TrainBatch, level: str) -> Tensor:
    """`[N, T]` log of the rollout importance weight from the batch's `old_logp` (a pass of its own) and
    `rollout_logp`: per token (`token`), or the response's sum on each of its tokens (`sequence`); 0 at
    padding."""
    if batch.old_logp is None or batch.rollout_logp is None:
        raise ValueError(f"rollout_is={level} needs TrainBatch.old_logp and TrainBatch.rollout_logp")
    t = batch.old_logp.shape[1]
    valid = torch.arange(t)[None, :] < batch.response_lens[:, None]
    diff = torch.where(valid, batch.old_logp.to(STAT_DTYPE) - batch.rollout_logp[:, :t].to(STAT_DTYPE), 0.0)
    if level == "sequence":
        diff = torch.where(valid, diff.sum(dim=1, keepdim=True), 0.0)
    return diff.float()


def critic_loss(output: Tensor, micro_batch: dict[str, Tensor], settings: LossSettings, counts: Denominators
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss `0.5 * Agg(e)` share of one micro-batch from the critic's `[b, S/cp, 1]`."""
    mask = micro_batch["mask"]
    values = torch.where(mask, output.squeeze(-1).float(), 0.0)
    old_values = micro_batch["old_values"] if "old_values" in micro_batch else values.detach()
    e, value_stats = value_loss(values, old_values, micro_batch["returns"], mask, clip=settings.value_clip)
    loss = _agg(e, micro_batch, settings, counts)
    sums = _sums(CRITIC_SUMS, {"loss": loss, "value_loss": loss, **value_stats})
    return loss, {"sums": sums, "maxima": sums.new_zeros(len(ACTOR_MAXIMA))}
