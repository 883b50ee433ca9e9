"""Packed sequences (megatron's THD layout): a micro-batch is one row of whole sequences end to end.

The RL batch holds many sequences of ragged length; padding each micro-batch to its longest sequence
pays for the padding in every layer. Packed, a micro-batch is one row `[1, T]` of several sequences,
each a *segment* of the row, with `PackedSeqParams` (`cu_seqlens`, the segments' start offsets) telling
the attention and the rotary embedding where each starts: positions restart at every segment and no
token attends across a segment's boundary.

Layout of one packed row (`PackPlan`):

- segment `j` holds sequence `rows[j]` (prompt then response), padded to `seg_lens[j]`, a multiple of
  `2 * cp` under context parallelism (each segment is cut into `2 * cp` chunks, rank r keeping chunks
  r and 2cp-1-r of every segment, the layout megatron's THD rotary embedding and Transformer Engine
  expect), else its own length;
- after the last sequence, a padding segment up to `row_len`: a multiple of `cp * tp` under sequence
  parallelism (the local row splits over TP) and of `2 * cp`; with pipeline parallelism every row has
  the same `row_len` (stages exchange activations of one shape).

Sequences go into rows longest first, each into the first row with room for it (first-fit
decreasing) under `max_tokens` per row and `max_seqs` sequences per row; a sequence longer than
`max_tokens` gets a row of its own. Every row is a pass through the model, so when first-fit leaves
more rows than the tokens need (`ceil(tokens / max_tokens)`), rows filled one by one with the
fullest subset of what is left (`_fullest_rows`, an exact subset sum) are taken instead when they are
fewer: on a batch whose tokens fill the bound exactly, first-fit's last row often holds a single
short sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.parallel.device import to_device


@dataclass(frozen=True)
class PackPlan:
    rows: Tensor                 # indices (into the share) of the row's sequences, in segment order
    seg_lens: tuple[int, ...]    # padded length of each sequence's segment
    row_len: int                 # tokens of the row, the trailing padding segment included

    @property
    def segments(self) -> tuple[int, ...]:
        """Every segment's length, the trailing padding segment (if any) included: sums to row_len."""
        tail = self.row_len - sum(self.seg_lens)
        return self.seg_lens + ((tail,) if tail else ())

    @property
    def offsets(self) -> list[int]:
        """Start of each sequence's segment in the row."""
        out, at = [], 0
        for length in self.seg_lens:
            out.append(at)
            at += length
        return out

    @property
    def padding(self) -> int:
        return self.row_len - sum(self.seg_lens)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pack_multiples(cp: int, tp: int, sequence_parallel: bool) -> tuple[int, int]:
    """(what each segment's length must be a multiple of, what each row's length must be a multiple of)."""
    seg = 2 * cp if cp > 1 else 1
    row = math.lcm(seg, cp * (tp if sequence_parallel else 1))
    return seg, row


def _fullest_rows(sizes: list[int], max_tokens: int) -> list[list[int]]:
    """Rows filled one at a time, each with the subset of the sizes left whose sum is largest within
    `max_tokens` (an exact subset sum: Python integers as bit sets of the reachable sums); positions
    into `sizes`, which are each <= max_tokens."""
    full = (1 << (max_tokens + 1)) - 1
    left, rows = list(range(len(sizes))), []
    while left:
        reach = [1]  # reach[j]: the sums reachable with the first j items left (bit s set: sum s)
        for i in left:
            reach.append((reach[-1] | (reach[-1] << sizes[i])) & full)
        total = reach[-1].bit_length() - 1
        row = []
        for j in range(len(left), 0, -1):  # walk back: item j-1 is needed when total is not reachable without
            if not (reach[j - 1] >> total) & 1:
                row.append(left[j - 1])
                total -= sizes[left[j - 1]]
        row.reverse()
        rows.append(row)
        taken = set(row)
        left = [i for i in left if i not in taken]
    return rows


def pack_micro_batches(seq_lens: Tensor, *, max_tokens: int, max_seqs: int | None = None, seg_multiple: int = 1,
                       row_multiple: int = 1, pipeline: bool = False) -> list[PackPlan]:
    """Pack a share's sequences (total lengths `seq_lens [n]`) into rows; see the module docstring."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = torch.sort(seq_lens, descending=True, stable=True).indices.tolist()
    padded = [_round_up(n, seg_multiple) for n in seq_lens.tolist()]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, left in enumerate(room):
            if padded[i] <= left and (max_seqs is None or len(bins[b]) < max_seqs):
                bins[b].append(i)
                room[b] -= padded[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - padded[i])  # negative for a sequence longer than max_tokens: alone
    fits = [i for i in order if padded[i] <= max_tokens]
    need = -(-sum(padded[i] for i in fits) // max_tokens)
    alone = [b for b in bins if padded[b[0]] > max_tokens]
    if max_seqs is None and len(bins) - len(alone) > need:  # first-fit left a row more than the tokens need
        fullest = [[fits[j] for j in row] for row in _fullest_rows([padded[i] for i in fits], max_tokens)]
        if len(fullest) < len(bins) - len(alone):
            rank = {i: r for r, i in enumerate(order)}
            bins = sorted(alone + fullest, key=lambda b: rank[b[0]])
    used = [sum(padded[i] for i in b) for b in bins]
    fixed = _round_up(max(max(used), max_tokens), row_multiple) if pipeline else None
    return [PackPlan(torch.tensor(b, dtype=torch.long), tuple(padded[i] for i in b),
                     fixed if fixed is not None else _round_up(u, row_multiple))
            for b, u in zip(bins, used)]


def packed_positions(plan: PackPlan, cp_rank: int = 0, cp_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(segment id, position within the segment) of each token this CP rank holds, `[row_len / cp]` int64
    each, in the rank's order: per segment, chunk r then chunk 2cp-1-r of its 2cp chunks. Host index
    arithmetic, in numpy: a handful of array operations whatever the number of segments."""
    segments = np.asarray(plan.segments, dtype=np.int64)
    local = segments // cp_size  # this rank's tokens of each segment
    seg = np.repeat(np.arange(segments.size), local)
    at = np.arange(seg.size) - (np.cumsum(local) - local)[seg]  # index within the local segment
    if cp_size == 1:
        return seg, at
    chunk = (segments // (2 * cp_size))[seg]
    return seg, np.where(at < chunk, cp_rank * chunk + at, (2 * cp_size - 2 - cp_rank) * chunk + at)


def cp_gather_packed(x: Tensor, plan: PackPlan, group, cp_size: int) -> Tensor:
    """Per-token scalars `[1, row_len / cp]` of every CP rank (each in `packed_positions` order) -> the whole
    row `[1, row_len]` on every CP rank."""
    if cp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    local = [seg // cp_size for seg in plan.segments]
    per_rank = [part.split(local, dim=1) for part in parts]
    out = []
    for s in range(len(local)):
        chunks: list[Tensor | None] = [None] * (2 * cp_size)
        for r in range(cp_size):
            chunks[r], chunks[2 * cp_size - 1 - r] = per_rank[r][s].chunk(2, dim=1)
        out += chunks
    return torch.cat(out, dim=1)  # type: ignore[arg-type]


def response_index(plan: PackPlan, prompt_lens: Tensor, response_lens: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Row positions predicting response token t of each of the plan's sequences, `[k, width]`, and the
    mask of real tokens (t < L_j): with it a packed row's per-token values go to response coordinates."""
    t = torch.arange(width)[None, :]
    offsets = torch.tensor(plan.offsets, dtype=torch.long)[:, None]
    idx = offsets + (prompt_lens - 1)[:, None] + t
    valid = t < response_lens[:, None]
    return idx.clamp(max=plan.row_len - 1), valid


def packed_seq_params(plan: PackPlan, device: torch.device, cp_rank: int = 0, cp_size: int = 1):
    """megatron's PackedSeqParams of the row (THD): the segments' boundaries, on `device`. The plan rides
    along (`liteppo_plan`, what our SDPA attention re-pads by) and so do the positions of this CP rank's
    tokens within their segments (`liteppo_positions`: numpy, as `packed_positions`; on `cu_seqlens`, on
    the device, for the rotary embedding of models/rope.py)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from liteppo_mcore.models.rope import ROPE_POSITIONS

    segments = plan.segments
    seg, pos = packed_positions(plan, cp_rank, cp_size)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(segments)]).astype(np.int32))
    cu = to_device(cu, device)
    setattr(cu, ROPE_POSITIONS, to_device(torch.from_numpy(pos), device))
    longest = max(segments)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
    params.liteppo_plan = plan
    params.liteppo_positions = (seg, pos)
    return params
