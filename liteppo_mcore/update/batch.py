"""The step's responses as the update sees them: mini-batches, DP shares and micro-batches.

docs/semantics.md section 5: each epoch draws a permutation of the step's N responses from
(seed, step, epoch); mini-batch k is its k-th slice; each DP rank takes an equal, contiguous share of
that slice; each share is cut into micro-batches. Mini-batch composition therefore does not depend on
the DP size. The per-response tensors are small next to the model, so every rank first receives the
whole step batch (`gather_over_dp`) and then selects its share locally.

Per-token tensors live in response coordinates `[N, T]` (token t of response i at column t, 0 past
`L_i`); `micro_batches` moves them to sequence positions (the position that predicts the token) and
splits them over CP exactly like the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from liteppo_mcore.models.forward import (
    SequenceBatch,
    cp_split,
    packed_micro_batch,
    shifted_labels_and_mask,
    to_sequence_coords,
)
from liteppo_mcore.models.microbatch import MicroPlan
from liteppo_mcore.models.packing import PackPlan
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.parallel.reducer import all_gather_padded
from liteppo_mcore.utils.seeds import mix_seed

PER_TOKEN_KEYS = ("advantages", "old_logp", "ref_logp", "returns", "old_values", "rollout_logp", "is_log_weight",
                  "loss_mask")


@dataclass
class TrainBatch:
    """Responses of one step (or a subset): sequences plus optional per-response-token tensors.

    `tokens [N, S]` prompt then response, right-padded; `prompt_lens`, `response_lens [N]`; the
    per-token tensors are `[N, T]` float. The actor needs `advantages` (and `old_logp` unless one
    optimizer update per step lets the update's own detached log-probs serve; `ref_logp` with the KL
    loss); the critic needs `returns` (and `old_values` for the value clip). `loss_mask` (1: in the
    losses; overlong_filter) leaves responses out of both losses and their denominators; `is_log_weight`
    is the log of the rollout importance weight (rollout_is, from a separate old-log-prob pass).
    """

    tokens: Tensor
    prompt_lens: Tensor
    response_lens: Tensor
    advantages: Tensor | None = None
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None
    rollout_logp: Tensor | None = None  # the engine's: the mismatch metric and rollout_is
    is_log_weight: Tensor | None = None
    loss_mask: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def per_token(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in PER_TOKEN_KEYS if getattr(self, k) is not None}

    def sequences(self) -> SequenceBatch:
        return SequenceBatch(self.tokens, self.prompt_lens, self.response_lens)

    def select(self, rows: Tensor) -> TrainBatch:
        """The responses `rows` (in that order), trimmed to their own longest sequence/response."""
        rows = rows.long()
        if rows.numel() == 0:
            raise ValueError("cannot select an empty set of responses")
        lens = self.prompt_lens[rows] + self.response_lens[rows]
        s, t = int(lens.max()), int(self.response_lens[rows].max())
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {"tokens": self.tokens[rows, :s], "prompt_lens": self.prompt_lens[rows],
               "response_lens": self.response_lens[rows]}
        for key in PER_TOKEN_KEYS:
            if values[key] is not None:
                out[key] = values[key][rows, :t]
        return TrainBatch(**out)

    def validate(self) -> None:
        n = self.size
        for name in ("prompt_lens", "response_lens"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"TrainBatch.{name} must be [N] = [{n}], got {tuple(getattr(self, name).shape)}")
        if bool((self.prompt_lens < 1).any()):
            raise ValueError("every prompt needs at least one token (TrainBatch.prompt_lens >= 1)")
        longest = int((self.prompt_lens + self.response_lens).max()) if n else 0
        if longest > self.tokens.shape[1]:
            raise ValueError(f"TrainBatch.tokens holds {self.tokens.shape[1]} positions, but a prompt plus "
                             f"response needs {longest}")
        width = int(self.response_lens.max()) if n else 0
        for key, value in self.per_token().items():
            if value.dim() != 2 or value.shape[0] != n or value.shape[1] < width:
                raise ValueError(f"TrainBatch.{key} must be [N, T>={width}] = [{n}, {width}], got {tuple(value.shape)}")


def gather_over_dp(local: TrainBatch, groups: ParallelGroups) -> TrainBatch:
    """Every DP rank's responses, concatenated in DP-rank order, on every rank.

    Each rank must hold the same number of responses and the same set of per-token tensors (every
    rank of a DP group calls this; TP/PP/CP ranks of one replica hold identical batches)."""
    local.validate()
    if groups.dp_size == 1:
        return local
    out = {}
    for f in fields(local):
        value = getattr(local, f.name)
        present = all_gather_padded(torch.tensor([value is not None]), groups.dp_group)
        if bool(present.any()) != bool(present.all()):
            raise ValueError(f"TrainBatch.{f.name} is set on some data-parallel ranks and not on others")
        if value is not None:
            out[f.name] = all_gather_padded(value, groups.dp_group, equal_rows=True)
    return TrainBatch(**out)


def minibatch_indices(num_responses: int, mini_batch_size: int, *, seed: int, step: int, epoch: int) -> list[Tensor]:
    """The mini-batches of one epoch: slices of a permutation drawn from (seed, step, epoch)."""
    if num_responses % mini_batch_size:
        raise ValueError(f"train.mini_batch_size={mini_batch_size} must divide the step's {num_responses} responses")
    perm = torch.randperm(num_responses, generator=torch.Generator().manual_seed(mix_seed(seed, step, epoch)))
    return list(perm.split(mini_batch_size))


def rank_share(indices: Tensor, dp_rank: int, dp_size: int) -> Tensor:
    """This DP rank's equal, contiguous share of one mini-batch's indices."""
    if indices.numel() % dp_size:
        raise ValueError(f"a mini-batch of {indices.numel()} responses does not split over dp={dp_size} ranks")
    per_rank = indices.numel() // dp_size
    return indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]


def _pad_rows(batch: TrainBatch, rows: int) -> TrainBatch:
    """Append empty sequences (one prompt token, no response) up to `rows` rows."""
    extra = rows - batch.size
    if extra <= 0:
        return batch
    def grow(x: Tensor, fill: int) -> Tensor:
        return torch.cat([x, x.new_full((extra, *x.shape[1:]), fill)])
    out = {"tokens": grow(batch.tokens, 0), "prompt_lens": grow(batch.prompt_lens, 1),
           "response_lens": grow(batch.response_lens, 0)}
    out.update({k: grow(v, 0) for k, v in batch.per_token().items()})
    return replace(batch, **out)


def micro_batches(rank_minibatch: TrainBatch, plans: Sequence[MicroPlan | PackPlan], groups: ParallelGroups,
                  device: torch.device) -> Iterator[dict]:
    """Model inputs and per-position targets of each micro-batch of this DP rank's share of a mini-batch
    (`plans` from models/forward.micro_batch_plans), this CP rank's part, on `device`.

    Keys: `tokens`, `labels`, `mask` (positions predicting a response token) `[b, S/cp]`; each
    per-token tensor of the batch at those positions; `seq_token_counts` (full response lengths, needed
    by seq-mean-token-mean when CP splits the tokens): `[b]` per row, or, for a packed row (`[1, T/cp]`,
    models/packing.py), at each position the length of its sequence's response; and `packed_seq_params`
    (megatron's PackedSeqParams, None for padded rows).
    """
    for plan in plans:
        if isinstance(plan, PackPlan):
            yield _apply_loss_mask(packed_micro_batch(rank_minibatch.sequences(), plan, groups, device,
                                                      rank_minibatch.per_token()))
            continue
        rows = _pad_rows(rank_minibatch.select(plan.rows), plan.num_rows)
        seqs = rows.sequences()
        tokens, labels, mask = shifted_labels_and_mask(seqs, plan.seq_len)
        item = {"tokens": tokens, "labels": labels, "mask": mask}
        for key, value in rows.per_token().items():
            item[key] = to_sequence_coords(value.float(), seqs, plan.seq_len)
        item = {k: cp_split(v, groups.cp_rank, groups.cp_size) for k, v in item.items()}
        item["seq_token_counts"] = rows.response_lens.clone()
        out: dict = {k: v.to(device) for k, v in item.items()}
        out["packed_seq_params"] = None
        yield _apply_loss_mask(out)


def _apply_loss_mask(item: dict) -> dict:
    """`mask` narrowed to the positions in the losses: the per-token `loss_mask` is folded into it."""
    if "loss_mask" in item:
        item["mask"] = item["mask"] & (item.pop("loss_mask") > 0)
    return item
