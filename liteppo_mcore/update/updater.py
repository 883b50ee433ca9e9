"""One PPO update of the actor or the critic: epochs -> mini-batches -> micro-batches through
megatron's pipeline schedule -> a guarded optimizer step per mini-batch.

    updater = ModelUpdater(models.actor, "actor", cfg, groups, vocab_size=V)
    step_batch = gather_over_dp(local_batch, groups)      # once per step, shared by actor and critic
    metrics = updater.update(step_batch, step=k)          # {"actor/pg_loss": ..., ...}

Gradient invariance (docs/semantics.md section 4): before each mini-batch the numbers of valid tokens
and of valid sequences of the whole mini-batch are summed over DP (every CP rank holds whole
sequences, so sequences and tokens are each counted once); the losses in `update/loss.py` divide by
them; megatron sums gradients over micro-batches and DP x CP ranks.

Non-finite weights: after every applied optimizer step the parameters this rank holds are checked
with one fused reduction (`optim.count_nonfinite`), summed over all ranks (every TP x PP x CP x DP rank
holds a different shard or replica; the world group is all of them) with one host synchronisation.
If any rank holds a NaN or an infinity, every rank raises `TrainingHalted` naming the model, the step,
the update and the first such parameter. The update is not undone: restoring the pre-step state needs
a copy of the master weights and both Adam moments taken before every step (12 bytes per parameter,
more than the model itself, in GPU memory or moved over PCIe every update), and the same step from
the same state would diverge again; the last checkpoint is that previous state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from liteppo_mcore.algo.stats import STAT_DTYPE
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.halt import NonFiniteParameter, nonfinite_weights_error
from liteppo_mcore.models.forward import micro_batch_plans, schedule_shape
from liteppo_mcore.models.output_head import hidden_states_out, used_weight
from liteppo_mcore.parallel.device import compute_device
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.parallel.reducer import Reducer, make_allreduce_max, make_allreduce_sum
from liteppo_mcore.update.batch import TrainBatch, micro_batches, minibatch_indices, rank_share
from liteppo_mcore.update.loss import (
    ACTOR_MAXIMA,
    ACTOR_SUMS,
    CRITIC_SUMS,
    Denominators,
    LossSettings,
    actor_loss,
    critic_loss,
    rollout_is_log_weights,
)
from liteppo_mcore.update.offload import offload_enabled, optimizer_state_on_device
from liteppo_mcore.update.optim import (
    OptimSettings,
    count_nonfinite,
    group_by_dtype,
    guarded_step,
    learning_rate,
    set_learning_rate,
    wrap_for_training,
)

log = logging.getLogger(__name__)


@dataclass
class _StepTotals:
    """Reduced metric sums over the mini-batches of one step."""

    sums: Tensor
    maxima: Tensor = field(default_factory=lambda: torch.zeros(len(ACTOR_MAXIMA), dtype=STAT_DTYPE))
    grad_norms: list[float] = field(default_factory=list)
    lr: float = 0.0
    num_minibatches: int = 0
    skipped: list[str] = field(default_factory=list)
    has_rollout_logp: bool = False


class ModelUpdater:
    """The training state of one model (DDP wrapper, optimizer, update counter) and its update."""

    def __init__(self, model: torch.nn.Module, kind: str, cfg: LitePPOConfig, groups: ParallelGroups, *,
                 vocab_size: int) -> None:
        if kind not in ("actor", "critic"):
            raise ValueError(f"kind must be 'actor' or 'critic', got {kind!r}")
        self.kind, self.cfg, self.groups, self.vocab_size = kind, cfg, groups, vocab_size
        self.loss_settings = LossSettings.from_config(cfg)
        self.optim_settings = OptimSettings.from_config(cfg, kind)
        self.model, self.optimizer = wrap_for_training(model, self.optim_settings)
        self.offload = offload_enabled(cfg.train.offload_between_phases)
        self.num_updates = 0  # applied optimizer steps: drives the LR schedule; checkpointed state
        self._sum_names = ACTOR_SUMS if kind == "actor" else CRITIC_SUMS
        self.reducer = Reducer(groups.dp_group, groups.dp_cp_group)
        self._pp_sum = make_allreduce_sum(groups.pp_group)
        self._pp_max = make_allreduce_max(groups.pp_group)
        self._named_params = list(model.named_parameters())
        self._param_groups = group_by_dtype(p for _, p in self._named_params)
        self._world_sum = make_allreduce_sum(dist.group.WORLD if dist.is_initialized() else None)

    # ------------------------------------------------------------------ the update
    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """`ppo_epochs` passes over the step's whole batch (the same on every rank: see gather_over_dp).

        `step` is the trainer's 0-based step counter (the step is logged as step + 1). Raises
        `TrainingHalted` on every rank when an applied update leaves a non-finite parameter."""
        self._check_inputs(batch)
        cfg = self.cfg
        totals = _StepTotals(sums=torch.zeros(len(self._sum_names), dtype=STAT_DTYPE),
                             has_rollout_logp=batch.rollout_logp is not None and batch.old_logp is None)
        if self.kind == "actor" and cfg.rollout_is is not None and batch.old_logp is not None:
            # once per step: the weights depend on old_logp and rollout_logp only, the same every epoch
            batch = replace(batch, is_log_weight=rollout_is_log_weights(batch, cfg.rollout_is))
        self.model.train()
        with optimizer_state_on_device(self.optimizer, self.offload):
            mini_batch_size = cfg.step_mini_batch_size(batch.size)
            for epoch in range(cfg.ppo_epochs):
                for indices in minibatch_indices(batch.size, mini_batch_size, seed=cfg.seed, step=step, epoch=epoch):
                    rank_minibatch = batch.select(rank_share(indices, self.groups.dp_rank, self.groups.dp_size))
                    self._train_minibatch(rank_minibatch, totals, step)
        return self._metrics(totals)

    def _check_inputs(self, batch: TrainBatch) -> None:
        batch.validate()
        need = ["advantages"] if self.kind == "actor" else ["returns"]
        if self.kind == "actor" and self.loss_settings.use_kl_loss:
            need.append("ref_logp")
        if self.kind == "actor" and self.cfg.updates_per_step(batch.size) > 1:
            need.append("old_logp")  # a single update may use its own detached log-probs (needs_old_logp_pass)
        if self.kind == "actor" and self.cfg.rollout_is is not None:
            need.append("rollout_logp")
            if self.cfg.rollout_is == "sequence":
                need.append("old_logp")  # the response's sum must be known before CP splits the response
        missing = [k for k in need if getattr(batch, k) is None]
        if missing:
            raise ValueError(f"the {self.kind} update needs TrainBatch.{', '.join(missing)}")

    def _denominators(self, rank_minibatch: TrainBatch) -> Denominators:
        """The mini-batch's global token and sequence counts, of the responses in the losses (loss_mask)."""
        lens = rank_minibatch.response_lens
        if rank_minibatch.loss_mask is not None:
            t = rank_minibatch.loss_mask.shape[1]
            valid = torch.arange(t)[None, :] < lens[:, None]
            lens = (valid & (rank_minibatch.loss_mask > 0)).sum(dim=1)
        local = torch.stack([lens.sum(), (lens > 0).sum()]).to(STAT_DTYPE)
        num_tokens, num_seqs = self.reducer.dp_sum(local).unbind()
        return Denominators(num_tokens=num_tokens, num_seqs=num_seqs)

    def _train_minibatch(self, rank_minibatch: TrainBatch, totals: _StepTotals, step: int) -> None:
        g, t = self.groups, self.cfg.train
        denominators = self._denominators(rank_minibatch)
        if float(denominators.num_tokens) == 0:
            # every response of the mini-batch is out of the losses (overlong_filter): no gradient, and an
            # optimizer step would still move the weights (momentum, weight decay); the same on every rank
            return
        plans = micro_batch_plans(rank_minibatch.sequences(), g, t.micro_batch_size, self.cfg.micro_batch_tokens,
                                  self.cfg.parallel.sequence_parallel, t.pack_sequences)
        seq_length, rows = schedule_shape(plans)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        data = micro_batches(rank_minibatch, plans, g, compute_device())
        store = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, denominators=denominators), data_iterator=data,
            model=[self.model], num_microbatches=len(plans), seq_length=seq_length, micro_batch_size=rows,
            forward_only=False)
        sums, maxima = self._reduce(store)
        lr = learning_rate(self.num_updates + 1, self.optim_settings)
        set_learning_rate(self.optimizer, lr)
        applied, grad_norm, reason = guarded_step(self.optimizer, self.optim_settings.clip_grad,
                                                  bool(torch.isfinite(sums).all()))
        totals.num_minibatches += 1
        if not applied:
            reason = reason or "the optimizer reported a failed step"
            totals.skipped.append(reason)
            log.warning("%s update skipped, weights unchanged: %s", self.kind, reason)
            return
        self.num_updates += 1
        self._check_weights(step)
        totals.sums += sums
        totals.maxima = torch.maximum(totals.maxima, maxima)
        totals.grad_norms.append(grad_norm)
        totals.lr = lr

    def _check_weights(self, step: int) -> None:
        """Raise `TrainingHalted` on every rank if the parameters of any rank are not all finite."""
        local = count_nonfinite(self._param_groups).to(STAT_DTYPE).reshape(1)
        if float(self._world_sum(local)) == 0:  # the one host synchronisation of the check
            return
        g = self.groups
        bad = next((name for name, p in self._named_params if not bool(torch.isfinite(p).all())), None)
        mine = None if bad is None else NonFiniteParameter(
            rank=dist.get_rank() if dist.is_initialized() else 0, name=bad,
            where=f"tp {g.tp_rank}, pp {g.pp_rank}, cp {g.cp_rank}, dp {g.dp_rank}")
        found = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, mine)
        bad_ranks = [f.rank for f in found if f is not None]
        raise nonfinite_weights_error(self.kind, step=step + 1, update=self.num_updates,
                                      first=next((f for f in found if f is not None), None),
                                      bad_ranks=bad_ranks, world_size=len(found))

    def _forward_step(self, data_iterator, model, denominators: Denominators):
        micro_batch = next(data_iterator)
        # the actor returns its last hidden states; its loss multiplies them by the output weight in chunks
        with hidden_states_out(model, enabled=self.kind == "actor") as layer:
            output = model(micro_batch["tokens"], None, attention_mask=None,
                           packed_seq_params=micro_batch["packed_seq_params"])
        if self.kind == "actor":
            loss_fn = partial(actor_loss, micro_batch=micro_batch, settings=self.loss_settings, counts=denominators,
                              groups=self.groups, vocab_size=self.vocab_size)
        else:
            loss_fn = partial(critic_loss, micro_batch=micro_batch, settings=self.loss_settings, counts=denominators)

        def loss_func(output_tensor):
            if self.kind == "actor":
                loss, metrics = loss_fn(output_tensor, weight=used_weight(layer))
            else:
                loss, metrics = loss_fn(output_tensor)
            num_tokens = micro_batch["mask"].sum().to(torch.int)
            return loss, num_tokens, metrics

        return output, loss_func

    def _reduce(self, store: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Sum the micro-batches' metric sums (held by the last stage) over PP, then DP x CP; the same
        with a maximum for their maxima (ACTOR_MAXIMA)."""
        sums = torch.zeros(len(self._sum_names), dtype=STAT_DTYPE)
        maxima = torch.zeros(len(ACTOR_MAXIMA), dtype=STAT_DTYPE)
        if self.groups.is_last_stage:
            for item in store:
                sums += item["sums"].cpu()
                maxima = torch.maximum(maxima, item["maxima"].cpu())
        # Non-last stages hold zeros: a sum over PP broadcasts the last stage's values.
        sums = self.reducer.dp_cp_sum(self._pp_sum(sums))
        maxima = self.reducer.dp_cp_max(self._pp_max(maxima))
        return sums, maxima

    # ------------------------------------------------------------------ metrics
    def _metrics(self, totals: _StepTotals) -> dict[str, float]:
        s = dict(zip(self._sum_names, totals.sums.tolist()))
        applied = max(1, len(totals.grad_norms))
        tokens = max(1.0, s["num_tokens"])
        nan = float("nan")
        prefix = self.kind
        out = {f"{prefix}/grad_norm": sum(totals.grad_norms) / applied if totals.grad_norms else nan,
               f"{prefix}/lr": totals.lr, f"{prefix}/skipped_updates": float(len(totals.skipped))}
        if prefix == "actor":
            out.update({"actor/pg_loss": s["pg_loss"] / applied, "actor/kl_loss": s["kl_loss"] / applied,
                        "actor/entropy": s["entropy_sum"] / tokens, "actor/clipfrac": s["clipfrac_sum"] / tokens,
                        "actor/clipfrac_low": s["clipfrac_low_sum"] / tokens,
                        "actor/clipfrac_high": s["clipfrac_high_sum"] / tokens,
                        "actor/dual_clipfrac": s["dual_clipfrac_sum"] / tokens,
                        "actor/approx_kl_k3": s["approx_kl_k3_sum"] / tokens,
                        "actor/approx_kl_k1": s["approx_kl_k1_sum"] / tokens})
            maxima = dict(zip(ACTOR_MAXIMA, totals.maxima.tolist()))
            out["actor/ratio_max"] = maxima["ratio_max"]
            if totals.has_rollout_logp:
                out["rollout/logprob_abs_diff"] = s["rollout_abs_diff_sum"] / tokens
            if self.cfg.rollout_is is not None:
                out.update({"rollout/is_weight_mean": s["is_weight_sum"] / tokens,
                            "rollout/is_weight_max": maxima["is_weight_max"],
                            "rollout/is_truncated_fraction": s["is_truncated_sum"] / tokens})
        else:
            out.update({"critic/value_loss": s["value_loss"] / applied,
                        "critic/vf_clipfrac": s["vf_clipfrac_sum"] / tokens,
                        "critic/values_mean": s["values_sum"] / tokens})
        if not totals.grad_norms:
            out = {k: (v if k.endswith(("skipped_updates", "/lr")) else nan) for k, v in out.items()}
        return out
