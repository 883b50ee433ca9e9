"""megatron DDP, the megatron optimizer, the learning-rate schedule and a guarded optimizer step.

bf16/fp16 models get fp32 master weights and fp32 gradient reduction (megatron's mixed-precision
optimizer); fp32 models are updated in place. The step is guarded: when the mini-batch loss or the
gradient norm is not finite, the update is skipped (weights and optimizer state untouched) and the
reason is returned for the log. After an applied step, `count_nonfinite` is the fused check that the
weights are still finite (the caller agrees on it over all ranks, see `update.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from liteppo_mcore.config.schema import LitePPOConfig


@dataclass(frozen=True)
class OptimSettings:
    """One model's optimizer keys (the critic takes its lr and weight decay from `critic.*`)."""

    optimizer: str
    lr: float
    min_lr: float
    weight_decay: float
    lr_schedule: str
    lr_warmup_steps: int
    total_updates: int
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    use_distributed_optimizer: bool

    @classmethod
    def from_config(cls, cfg: LitePPOConfig, kind: str) -> OptimSettings:
        t = cfg.train
        lr, wd = (cfg.critic.lr, cfg.critic.weight_decay) if kind == "critic" else (t.lr, t.weight_decay)
        # a filter_groups step short of informative groups makes fewer: the schedule then ends later
        updates_per_step = cfg.updates_per_step()
        return cls(optimizer=t.optimizer, lr=lr, min_lr=min(t.min_lr, lr), weight_decay=wd,
                   lr_schedule=t.lr_schedule, lr_warmup_steps=t.lr_warmup_steps,
                   total_updates=max(1, cfg.max_steps * updates_per_step), adam_beta1=t.adam_beta1,
                   adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad,
                   use_distributed_optimizer=t.use_distributed_optimizer)


def learning_rate(update: int, s: OptimSettings) -> float:
    """The learning rate of the `update`-th optimizer step (1-based): linear warm-up to `lr` over
    `lr_warmup_steps` steps, then constant, or cosine down to `min_lr` at `total_updates`."""
    if s.lr_warmup_steps > 0 and update <= s.lr_warmup_steps:
        return s.lr * update / s.lr_warmup_steps
    if s.lr_schedule == "constant":
        return s.lr
    span = max(1, s.total_updates - s.lr_warmup_steps)
    progress = min(1.0, max(0.0, (update - s.lr_warmup_steps) / span))
    return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _finalize_summed_grads(model, num_tokens=None, **kwargs) -> None:
    """megatron's grad finalization (DP reduce, SP norm and tied-embedding reductions) WITHOUT its
    division by the token count: our losses already carry their global denominators."""
    finalize_model_grads(model, None, **kwargs)


def wrap_for_training(model: torch.nn.Module, s: OptimSettings) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    """megatron DDP around `model` and a megatron optimizer over it."""
    config: TransformerConfig = model.config  # a megatron module's
    if not config.calculate_per_token_loss:
        raise RuntimeError("models for training must be built with calculate_per_token_loss=True (models/gpt.py)")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=s.use_distributed_optimizer,
        average_in_collective=False, check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="sgd" if s.optimizer == "sgd" else "adam", decoupled_weight_decay=s.optimizer == "adamw",
        sgd_momentum=0.0, lr=s.lr, min_lr=s.min_lr, weight_decay=s.weight_decay, adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2, adam_eps=s.adam_eps, clip_grad=s.clip_grad, bf16=config.bf16, fp16=config.fp16,
        params_dtype=config.params_dtype, use_distributed_optimizer=s.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    config.finalize_model_grads_func = _finalize_summed_grads
    if config.fp16:
        config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def guarded_step(optimizer, clip_grad: float, loss_is_finite: bool) -> tuple[bool, float, str | None]:
    """Clip and apply the gradients unless the loss or the gradient norm is not finite.

    Returns (applied, grad_norm before clipping, reason when skipped). Every rank reaches the same
    decision: the loss is reduced over all ranks by the caller and the norm by megatron.
    """
    found_inf = optimizer.prepare_grads()  # copies DP-reduced grads to the (master) params
    grad_norm = float(optimizer.get_grad_norm())
    if not loss_is_finite:
        return False, grad_norm, "the mini-batch loss is not finite"
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm, f"the gradient norm is not finite ({grad_norm})"
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm, None


def group_by_dtype(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """The non-empty `tensors` in one list per dtype: the fused (foreach) kernels take one dtype per call
    (and an infinity norm has no value for an empty tensor)."""
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


@torch.no_grad()
def count_nonfinite(groups: list[list[Tensor]]) -> Tensor:
    """How many of the tensors hold a NaN or an infinity: a 0-dim int64 tensor on their device, computed
    without a host synchronisation (one fused max-abs reduction per dtype, then one comparison).

    The infinity norm is the largest magnitude, which is finite for every finite tensor in every dtype
    (an L2 norm of finite fp16 weights can overflow) and NaN or infinite otherwise (the reduction
    propagates NaN on the CPU and in the CUDA foreach kernel)."""
    counts = [(~torch.isfinite(torch.stack(torch._foreach_norm(g, math.inf)))).sum() for g in groups if g]
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum()
