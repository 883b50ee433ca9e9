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
`max_tokens` gets a row of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


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


def pack_micro_batches(seq_lens: Tensor, *, max_tokens: int, max_seqs: int | None = None, seg_multiple: int = 1,
                       row_multiple: int = 1, pipeline: bool = False) -> list[PackPlan]:
    """Pack a share's sequences (total lengths `seq_lens [n]`) into rows; see the module docstring."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = torch.sort(seq_lens, descending=True, stable=True).indices.tolist()
    padded = {i: _round_up(int(seq_lens[i]), seg_multiple) for i in order}
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
    used = [sum(padded[i] for i in b) for b in bins]
    fixed = _round_up(max(max(used), max_tokens), row_multiple) if pipeline else None
    return [PackPlan(torch.tensor(b, dtype=torch.long), tuple(padded[i] for i in b),
                     fixed if fixed is not None else _round_up(u, row_multiple))
            for b, u in zip(bins, used)]


def to_packed_row(per_seq: Tensor, plan: PackPlan) -> Tensor:
    """Sequence-coordinate values `[k, S]` of the plan's sequences (row j = segment j, positions from 0)
    -> the packed row `[1, row_len]` (0 in padding)."""
    out = per_seq.new_zeros(1, plan.row_len)
    for j, (start, length) in enumerate(zip(plan.offsets, plan.seg_lens)):
        width = min(length, per_seq.shape[1])
        out[0, start:start + width] = per_seq[j, :width]
    return out


def packed_positions(plan: PackPlan, cp_rank: int = 0, cp_size: int = 1) -> tuple[Tensor, Tensor]:
    """(segment id, position within the segment) of each token this CP rank holds, `[row_len / cp]` each,
    in the rank's order: per segment, chunk r then chunk 2cp-1-r of its 2cp chunks."""
    seg_ids, positions = [], []
    for s, length in enumerate(plan.segments):
        pos = torch.arange(length)
        if cp_size > 1:
            chunks = pos.chunk(2 * cp_size)
            pos = torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])
        seg_ids.append(torch.full((pos.numel(),), s, dtype=torch.long))
        positions.append(pos)
    return torch.cat(seg_ids), torch.cat(positions)


def cp_split_packed(x: Tensor, plan: PackPlan, cp_rank: int, cp_size: int) -> Tensor:
    """This CP rank's part of a packed row `[1, row_len, ...]`: per segment, chunks r and 2cp-1-r."""
    if cp_size == 1:
        return x
    parts = []
    for seg in x.split(list(plan.segments), dim=1):
        chunks = seg.chunk(2 * cp_size, dim=1)
        parts += [chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]]
    return torch.cat(parts, dim=1)


def cp_gather_packed(x: Tensor, plan: PackPlan, group, cp_size: int) -> Tensor:
    """Inverse of cp_split_packed for per-token scalars `[1, row_len / cp]` -> `[1, row_len]` on every CP rank."""
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


def packed_seq_params(plan: PackPlan, device: torch.device):
    """megatron's PackedSeqParams of the row (THD): the segments' boundaries, on `device`."""
    from megatron.core.packed_seq_params import PackedSeqParams

    segments = plan.segments
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    cu = cu.to(device)
    longest = max(segments)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
    params.liteppo_plan = plan  # what our SDPA attention builds its mask from
    return params
