"""From generations to a training batch: sequences, rewards, normalization, advantages, and the step
metrics about them (docs/semantics.md sections 1-3 and 6). Every statistic is global over DP."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from liteppo_mcore.algo import (
    compute_advantages,
    global_moments,
    kl_estimate,
    mean_of_sequence_means,
    normalize_rewards,
    token_level_rewards,
)
from liteppo_mcore.algo.normalization import RunningMoments
from liteppo_mcore.algo.stats import STAT_DTYPE
from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.parallel.reducer import Reducer
from liteppo_mcore.rollout.engine import Generation
from liteppo_mcore.update.batch import PER_TOKEN_KEYS, TrainBatch


@dataclass
class Rollout:
    """This DP rank's responses of one step: whole groups, response k*n..k*n+n-1 of prompt k."""

    batch: TrainBatch            # tokens, prompt_lens, response_lens (per-token tensors filled later)
    rollout_logp: Tensor         # [N, T] the engine's log-probs
    finish_reasons: list[str]
    response_texts: list[str]
    answers: list[str]

    @property
    def mask(self) -> Tensor:
        t = self.rollout_logp.shape[1]
        return torch.arange(t)[None, :] < self.batch.response_lens[:, None]

    @property
    def overlong(self) -> Tensor:
        """[N] bool: responses that reached response_length without a stop token (finish reason "length")."""
        return torch.tensor([r == "length" for r in self.finish_reasons], dtype=torch.bool)


def build_rollout(prompts: Sequence[Sequence[int]], answers: Sequence[str], generations: list[list[Generation]],
                  tokenizer) -> Rollout:
    """Pack prompt + response token ids, right-padded, in group order."""
    rows, prompt_lens, response_lens, logps, reasons, texts, row_answers = [], [], [], [], [], [], []
    for prompt, answer, group in zip(prompts, answers, generations):
        for gen in group:
            rows.append(list(prompt) + list(gen.token_ids))
            prompt_lens.append(len(prompt))
            response_lens.append(len(gen.token_ids))
            logps.append(list(gen.logprobs))
            reasons.append(gen.finish_reason)
            texts.append(tokenizer.decode(gen.token_ids, skip_special_tokens=True))
            row_answers.append(answer)
    n = len(rows)
    width = max((len(r) for r in rows), default=1)
    t = max(max(response_lens, default=1), 1)
    tokens = torch.zeros(n, width, dtype=torch.long)
    logp = torch.zeros(n, t, dtype=torch.float32)
    for i, (row, lp) in enumerate(zip(rows, logps)):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        logp[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    batch = TrainBatch(tokens=tokens, prompt_lens=torch.tensor(prompt_lens, dtype=torch.long),
                       response_lens=torch.tensor(response_lens, dtype=torch.long))
    return Rollout(batch=batch, rollout_logp=logp, finish_reasons=reasons, response_texts=texts, answers=row_answers)


def global_summary(x: Tensor, reducer: Reducer, prefix: str, mask: Tensor | None = None) -> dict[str, float]:
    """`{prefix}/mean, /std, /max, /min` of the valid entries of `x` over every DP rank."""
    moments = global_moments(x, mask, allreduce_sum=reducer.dp_sum)
    values = x.detach().to(STAT_DTYPE)
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    # max of x and of -x in one collective; -inf (neutral) on a rank without valid entries
    signed = torch.stack([torch.where(valid, values, -torch.inf), torch.where(valid, -values, -torch.inf)])
    local = signed.flatten(1).amax(dim=1) if values.numel() else torch.full((2,), -torch.inf, dtype=STAT_DTYPE)
    hi, neg_lo = reducer.dp_max(local).tolist()
    return {f"{prefix}/mean": float(moments.mean), f"{prefix}/std": float(moments.var().sqrt()), f"{prefix}/max": hi,
            f"{prefix}/min": -neg_lo}


def rollout_metrics(rollout: Rollout, reducer: Reducer) -> dict[str, float]:
    """`response_length/{mean,max,clip_ratio}` and `rollout/overlong_fraction` over every DP rank."""
    lens = rollout.batch.response_lens.to(STAT_DTYPE)
    clipped = rollout.overlong.to(STAT_DTYPE)
    local = torch.stack([lens.sum(), torch.tensor(float(lens.numel()), dtype=STAT_DTYPE), clipped.sum()])
    total, count, num_clipped = reducer.dp_sum(local).tolist()
    longest = reducer.dp_max(lens.max().reshape(1) if lens.numel() else torch.zeros(1, dtype=STAT_DTYPE))
    # the same share under two names: the clip ratio of the lengths, and what overlong_filter leaves out
    return {"response_length/mean": total / max(count, 1.0), "response_length/max": float(longest),
            "response_length/clip_ratio": num_clipped / max(count, 1.0),
            "rollout/overlong_fraction": num_clipped / max(count, 1.0)}


def normalized_rewards(scores: Tensor, cfg: LitePPOConfig, reducer: Reducer,
                       running: RunningMoments | None) -> Tensor:
    return normalize_rewards(scores, group_size=cfg.num_return_sequences_in_group, reward_norm=cfg.reward_norm,
                             div_std_global=cfg.div_std_global, reward_shift=cfg.reward_shift,
                             reward_scale=cfg.reward_scale, reward_clip=cfg.reward_clip, running=running,
                             allreduce_sum=reducer.dp_sum)


def advantages_and_returns(rollout: Rollout, normalized: Tensor, cfg: LitePPOConfig, reducer: Reducer, *,
                           kl_coef: float, values: Tensor | None, full_kl: Tensor | None = None
                           ) -> dict[str, float]:
    """Token rewards (with the token-level KL when configured), then advantages and returns written
    into `rollout.batch`; returns the `kl/*` and `adv/*` metrics. `full_kl` is the exact per-token KL
    (`kl_penalty: full`, computed from both models' logits); otherwise the estimator of `kl_penalty`."""
    batch, mask = rollout.batch, rollout.mask
    metrics: dict[str, float] = {}
    kl = None
    if full_kl is not None:
        kl = torch.where(mask, full_kl, 0.0)
    elif batch.ref_logp is not None and batch.old_logp is not None:
        kl = torch.where(mask, kl_estimate(batch.old_logp, batch.ref_logp, cfg.kl_penalty), 0.0)
    if kl is not None:
        metrics["kl/mean"] = float(mean_of_sequence_means(kl, mask, allreduce_sum=reducer.dp_sum))
    token_rewards = token_level_rewards(normalized.float(), mask, kl=kl if cfg.add_token_level_kl else None,
                                        kl_coef=kl_coef)
    in_loss = ~rollout.overlong if cfg.overlong_filter else None
    adv, ret = compute_advantages(cfg.adv_estimator, mask, token_rewards=token_rewards, values=values,
                                  normalized_scores=normalized.float(), gamma=cfg.gamma, lambd=cfg.lambd,
                                  whiten=cfg.whiten_advantages, advantage_clip=cfg.advantage_clip,
                                  allreduce_sum=reducer.dp_sum, group_size=cfg.num_return_sequences_in_group,
                                  in_loss=in_loss)
    batch.advantages, batch.returns = adv.float(), ret.float()
    if values is not None:
        batch.old_values = values
    if in_loss is not None:  # the overlong responses leave the losses and their denominators
        mask = mask & in_loss[:, None]
        batch.loss_mask = mask.float()
    moments = global_moments(adv, mask, allreduce_sum=reducer.dp_sum)
    metrics.update({"adv/mean": float(moments.mean), "adv/std": float(moments.var().sqrt())})
    if cfg.advantage_clip is not None:
        hit = (mask & (adv.abs() >= cfg.advantage_clip)).sum().to(STAT_DTYPE)
        metrics["adv/clip_frac"] = float(reducer.dp_sum(hit.reshape(1))) / max(float(moments.count), 1.0)
    return metrics


# ---------------------------------------------------------------------------------------------------
# Selecting and joining responses (dynamic sampling, trainer/dynamic_sampling.py)

def select_responses(rollout: Rollout, rows: Sequence[int] | Tensor) -> Rollout:
    """The responses `rows` of `rollout`, in that order (an empty selection is allowed), with every
    per-response field; the tensors trimmed to the selection's own longest sequence and response."""
    index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)

    def take(obj):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, TrainBatch):
                value = take(value)
            elif isinstance(value, Tensor):
                value = value[index]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            out[f.name] = value
        return type(obj)(**out)

    return concat_rollouts([take(rollout)])


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """The responses of `parts` one after the other, every per-response field with them; the tensors
    right-padded with zeros (or trimmed) to the longest sequence and response of the result."""
    if not parts:
        raise ValueError("concat_rollouts needs at least one rollout")
    lens = torch.cat([p.batch.prompt_lens + p.batch.response_lens for p in parts])
    response_lens = torch.cat([p.batch.response_lens for p in parts])
    seq_width = max(int(lens.max()) if lens.numel() else 0, 1)
    token_width = max(int(response_lens.max()) if response_lens.numel() else 0, 1)

    def fit(x: Tensor, width: int) -> Tensor:
        if x.shape[1] >= width:
            return x[:, :width]
        return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)

    def join(objs):
        out = {}
        for f in fields(objs[0]):
            values = [getattr(o, f.name) for o in objs]
            present = [v is not None for v in values]
            if not any(present):
                out[f.name] = None
                continue
            if not all(present):
                raise ValueError(f"{type(objs[0]).__name__}.{f.name} is set on some rollouts and not on others")
            first = values[0]
            if isinstance(first, TrainBatch):
                out[f.name] = join(values)
            elif isinstance(first, Tensor) and first.dim() == 2:  # [N, S] sequences or [N, T] per token
                width = seq_width if f.name == "tokens" else token_width
                if isinstance(objs[0], TrainBatch) and f.name != "tokens" and f.name not in PER_TOKEN_KEYS:
                    raise ValueError(f"TrainBatch.{f.name}: unknown two-dimensional field")
                out[f.name] = torch.cat([fit(v, width) for v in values])
            elif isinstance(first, Tensor):
                out[f.name] = torch.cat(values)
            else:
                out[f.name] = [x for v in values for x in v]
        return type(objs[0])(**out)

    return join(list(parts))
