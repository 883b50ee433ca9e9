"""Cutting a batch of sequences into micro-batches: longest first, at most `micro_batch_size` rows and
(optionally) `max_tokens` padded tokens each. Training and the forward-only passes (reference,
old log-probs, values, full KL) use the same plans, so a batch that fits one fits the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroPlan:
    rows: Tensor   # indices into the share
    seq_len: int   # padded sequence length of this micro-batch (whole sequence, before the CP split)
    num_rows: int  # rows of the micro-batch, padding rows (no valid token) included


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def plan_micro_batches(seq_lens: Tensor, *, micro_batch_size: int, max_tokens: int | None,
                       pipeline: bool, multiple: int) -> list[MicroPlan]:
    """Cut a share (total lengths `seq_lens [n]`) into micro-batches, longest sequences first.

    Each micro-batch holds at most `micro_batch_size` sequences and, with `max_tokens`, at most that
    many padded tokens. Without pipeline parallelism each micro-batch is padded to its own longest
    sequence. Pipeline stages exchange activations of one fixed shape, so with PP every micro-batch
    has the same row count and length (the share's longest), the last one filled with empty rows.
    """
    order = torch.sort(seq_lens, descending=True, stable=True).indices
    lens = seq_lens[order].tolist()
    if pipeline:
        seq_len = _round_up(int(lens[0]), multiple)
        rows = micro_batch_size if max_tokens is None else max(1, min(micro_batch_size, max_tokens // seq_len))
        return [MicroPlan(chunk, seq_len, rows) for chunk in order.split(rows)]
    plans, start = [], 0
    while start < len(lens):
        seq_len = _round_up(int(lens[start]), multiple)
        stop = min(start + micro_batch_size, len(lens))
        if max_tokens is not None:
            stop = min(stop, start + max(1, max_tokens // seq_len))
        plans.append(MicroPlan(order[start:stop], seq_len, stop - start))
        start = stop
    return plans
