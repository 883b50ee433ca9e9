"""Packed sequences (models/packing.py): the plans, the row layout, the CP split, the way back to response
coordinates, the attention's block-diagonal causal mask and the per-token aggregation counts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from liteppo_mcore.models.packing import (
    PackPlan,
    pack_micro_batches,
    pack_multiples,
    packed_positions,
    packed_seq_params,
    response_index,
)


def test_first_fit_decreasing_rows():
    plans = pack_micro_batches(torch.tensor([5, 10, 2, 9, 6]), max_tokens=16)
    # longest first: 10 -> row 0; 9 -> row 1; 6 fits row 0; 5 fits row 1; 2 fits row 1 (16 - 14)
    assert [p.rows.tolist() for p in plans] == [[1, 4], [3, 0, 2]]
    assert [p.seg_lens for p in plans] == [(10, 6), (9, 5, 2)]
    assert [p.row_len for p in plans] == [16, 16] and [p.padding for p in plans] == [0, 0]


@pytest.mark.parametrize("cp,tp,sp,pipeline", [(1, 1, False, False), (2, 1, False, False), (2, 2, True, False),
                                               (1, 2, True, True), (3, 1, False, True)])
def test_plans_hold_every_sequence_once_within_the_bounds(cp, tp, sp, pipeline):
    g = torch.Generator().manual_seed(cp * 10 + tp)
    lens = torch.randint(1, 40, (37,), generator=g)
    seg, row = pack_multiples(cp, tp, sp)
    plans = pack_micro_batches(lens, max_tokens=64, seg_multiple=seg, row_multiple=row, pipeline=pipeline)
    assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(37))
    for p in plans:
        assert all(s % seg == 0 and s >= int(lens[i]) for s, i in zip(p.seg_lens, p.rows.tolist()))
        assert all(s - int(lens[i]) < seg for s, i in zip(p.seg_lens, p.rows.tolist()))
        assert sum(p.seg_lens) <= 64 or len(p.seg_lens) == 1
        assert p.row_len % row == 0 and p.row_len >= sum(p.seg_lens) and sum(p.segments) == p.row_len
        assert all(s % seg == 0 for s in p.segments)
        if sp:
            assert (p.row_len // cp) % tp == 0  # the local row splits over TP
    if pipeline:
        assert len({p.row_len for p in plans}) == 1  # stages exchange one shape
    else:
        assert all(p.padding < row for p in plans)
    # packing beats one sequence per row: far fewer rows than sequences
    assert len(plans) <= 37 // 2


def test_rows_no_more_than_the_tokens_need_when_first_fit_leaves_one_over():
    # an RL batch of exactly 1024 tokens: first-fit decreasing makes 3 rows of <= 512 (503, 496, 25) and 5
    # of <= 256; a row holding the fullest subset of what is left, in turn, fills 2 and 4 rows exactly
    lens = torch.tensor([25, 34, 44, 44, 52, 60, 62, 62, 64, 74, 75, 83, 84, 86, 87, 88])
    for bound, rows in ((512, 2), (256, 4)):
        plans = pack_micro_batches(lens, max_tokens=bound)
        assert [p.row_len for p in plans] == [bound] * rows
        assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(16))
        assert all(p.seg_lens == tuple(int(lens[i]) for i in p.rows) for p in plans)
    # a sequence longer than the bound keeps its own row; the rest are packed around it
    plans = pack_micro_batches(torch.cat([lens, torch.tensor([600])]), max_tokens=512)
    assert [p.row_len for p in plans] == [600, 512, 512]


def test_packing_never_takes_more_rows_than_first_fit():
    from liteppo_mcore.models.packing import _fullest_rows

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        lens = torch.randint(1, 90, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g)
        plans = pack_micro_batches(lens, max_tokens=128)
        first_fit = pack_micro_batches(lens, max_tokens=128, max_seqs=lens.numel())  # max_seqs: first-fit only
        assert len(plans) <= len(first_fit)
        assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(lens.numel()))
        assert all(sum(p.seg_lens) <= 128 for p in plans)
    sizes = [7, 5, 4, 3, 1]
    rows = _fullest_rows(sizes, 8)  # two rows of exactly 8 (7+1, 5+3), then 4; first-fit: 7+1, 5+3, 4 too
    assert sorted(rows) == [[0, 4], [1, 3], [2]] and [sum(sizes[i] for i in r) for r in rows] == [8, 8, 4]


def test_a_sequence_longer_than_the_bound_gets_a_row_of_its_own():
    plans = pack_micro_batches(torch.tensor([3, 50, 4]), max_tokens=10)
    assert [p.rows.tolist() for p in plans] == [[1], [2, 0]]
    assert plans[0].row_len == 50


def _groups(cp_rank: int = 0, cp_size: int = 1):
    from types import SimpleNamespace

    return SimpleNamespace(cp_rank=cp_rank, cp_size=cp_size)


def test_row_layout_and_response_coordinates():
    from liteppo_mcore.models.forward import SequenceBatch, packed_micro_batch

    plan = PackPlan(rows=torch.tensor([2, 0]), seg_lens=(6, 4), row_len=12)
    # sequence 0: prompt 1 + response 3 (tokens 7 8 9 10); sequence 2: prompt 2 + response 3 (1 .. 5)
    batch = SequenceBatch(tokens=torch.tensor([[7, 8, 9, 10, 0, 0, 0], [0] * 7, [1, 2, 3, 4, 5, 0, 0]]),
                          prompt_lens=torch.tensor([1, 1, 2]), response_lens=torch.tensor([3, 0, 3]))
    adv = torch.tensor([[0.1, 0.2, 0.3], [0.0] * 3, [1.0, 2.0, 3.0]])
    item = packed_micro_batch(batch, plan, _groups(), torch.device("cpu"), {"advantages": adv})
    assert item["tokens"].tolist() == [[1, 2, 3, 4, 5, 0, 7, 8, 9, 10, 0, 0]]
    assert item["labels"].tolist() == [[2, 3, 4, 5, 0, 0, 8, 9, 10, 0, 0, 0]]  # never the next segment's
    # sequence 2's response (tokens 3, 4, 5) is predicted at 1, 2, 3; sequence 0's (8, 9, 10) at 6, 7, 8
    assert item["mask"].nonzero()[:, 1].tolist() == [1, 2, 3, 6, 7, 8]
    assert torch.allclose(item["advantages"], torch.tensor([[0, 1, 2, 3, 0, 0, 0.1, 0.2, 0.3, 0, 0, 0]]))
    assert item["seq_token_counts"].tolist() == [[3] * 6 + [3] * 4 + [0, 0]]
    assert plan.segments == (6, 4, 2) and plan.offsets == [0, 6]
    idx, valid = response_index(plan, torch.tensor([2, 1]), torch.tensor([3, 3]), width=4)
    assert idx[:, :3].tolist() == [[1, 2, 3], [6, 7, 8]] and valid.tolist() == [[True] * 3 + [False]] * 2


def test_cp_split_takes_chunks_r_and_2cp_minus_1_minus_r_of_every_segment():
    from liteppo_mcore.models.forward import SequenceBatch, packed_micro_batch

    plan = PackPlan(rows=torch.tensor([0, 1]), seg_lens=(8, 4), row_len=16)  # segments 8, 4, tail 4
    batch = SequenceBatch(tokens=torch.arange(1, 17).reshape(2, 8), prompt_lens=torch.tensor([1, 1]),
                          response_lens=torch.tensor([7, 3]))
    starts = np.array([0, 8, 12])
    want = [[0, 1, 6, 7, 8, 11, 12, 15], [2, 3, 4, 5, 9, 10, 13, 14]]  # row positions of rank 0's, 1's tokens
    for r in range(2):
        seg, pos = packed_positions(plan, r, 2)
        assert (starts[seg] + pos).tolist() == want[r]
        tokens = packed_micro_batch(batch, plan, _groups(r, 2), torch.device("cpu"))["tokens"]
        row = torch.tensor(list(range(1, 13)) + [0] * 4)  # seq 0's 8 tokens, seq 1's first 4, the padding
        assert tokens.tolist() == [row[want[r]].tolist()]
    # three ranks: segments of 12 tokens in chunks of 2
    plan3 = PackPlan(rows=torch.tensor([0]), seg_lens=(12,), row_len=12)
    assert packed_positions(plan3, 1, 3)[1].tolist() == [2, 3, 8, 9]


def test_packed_seq_params_carry_the_segments():
    plan = PackPlan(rows=torch.tensor([0, 1]), seg_lens=(8, 4), row_len=16)
    from liteppo_mcore.models.rope import ROPE_POSITIONS

    params = packed_seq_params(plan, torch.device("cpu"))
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 8, 12, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 8 and params.liteppo_plan is plan
    # the rotary embedding's positions restart in every segment, the padding segment too
    assert getattr(params.cu_seqlens_q, ROPE_POSITIONS).tolist() == list(range(8)) + [0, 1, 2, 3] * 2


def test_packed_attention_equals_each_sequence_alone():
    """SDPACoreAttention on a packed row = causal attention of each sequence by itself (GQA included)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from liteppo_mcore.models.layers import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, attention_dropout=0.0)
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    plan = PackPlan(rows=torch.tensor([0, 1, 2]), seg_lens=(5, 3, 6), row_len=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    got = attn(q, k, v, None, packed_seq_params=packed_seq_params(plan, torch.device("cpu")))
    assert got.shape == (16, 1, 32)
    w_out = torch.randn(16, 1, 32, generator=g)
    w_out[14:] = 0  # the padding tail's outputs are never used
    got_grads = torch.autograd.grad((got * w_out).sum(), (q, k, v))
    want_out = []
    for start, length in zip(plan.offsets, plan.seg_lens):
        sl = slice(start, start + length)
        qs, ks, vs = (x[sl].permute(1, 0, 2) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(2, dim=0), vs.repeat_interleave(2, dim=0)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).permute(1, 0, 2).reshape(length, 32)
        assert torch.allclose(got[sl, 0], want, atol=1e-6)
        want_out.append(want)
    # the gradients too: every token's own, nothing across segments
    want_grads = torch.autograd.grad((torch.cat(want_out) * w_out[:14, 0]).sum(), (q, k, v))
    for got_g, want_g in zip(got_grads, want_grads):
        assert torch.allclose(got_g, want_g, atol=1e-6) and got_g.abs().sum() > 0


def test_per_token_sequence_counts_aggregate_like_per_row_counts():
    from liteppo_mcore.algo.aggregation import aggregate

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    counts = torch.tensor([4, 6, 1])  # full lengths (e.g. a CP split holds part of each)
    rows = aggregate(x, mask, mode="seq-mean-token-mean", num_tokens=7, num_seqs=3, seq_token_counts=counts)
    packed = aggregate(x.reshape(1, -1), mask.reshape(1, -1), mode="seq-mean-token-mean", num_tokens=7,
                       num_seqs=3, seq_token_counts=counts[:, None].expand(3, 5).reshape(1, -1))
    assert torch.allclose(rows, packed, atol=1e-6) and rows.abs() > 0


def test_packing_with_megatrons_local_attention_is_refused():
    from liteppo_mcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.pack_sequences=true: needs an attention that takes packed"):
        load_config(overrides=["model.attention_backend=local"], world_size=1)
    cfg = load_config(overrides=["model.attention_backend=local", "train.pack_sequences=false"], world_size=1)
    assert cfg.micro_batch_tokens is None


def test_the_default_token_bound_when_packing():
    from liteppo_mcore.config import load_config

    cfg = load_config(overrides=["train.micro_batch_size=3", "prompt_length=10", "response_length=20"], world_size=1)
    assert cfg.train.pack_sequences and cfg.micro_batch_tokens == 90
    cfg = load_config(overrides=["train.max_tokens_per_micro_batch=50", "prompt_length=10", "response_length=20"],
                      world_size=1)
    assert cfg.micro_batch_tokens == 50


def test_contiguous_slot_tables_equal_the_general_ones():
    """Without CP the attention's re-padding tables come in closed form; they equal the general
    construction (sorting tokens by segment and position) on random rows, trailing padding included."""
    import numpy as np

    from liteppo_mcore.models.layers import _contiguous_slots, _slots
    from liteppo_mcore.models.packing import packed_positions

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 7))
        seg_lens = tuple(int(x) for x in rng.integers(1, 30, k))
        plan = PackPlan(rows=torch.arange(k), seg_lens=seg_lens, row_len=sum(seg_lens) + int(rng.integers(0, 5)))
        seg, pos = packed_positions(plan)
        general = _slots(seg, pos, len(plan.segments))[:3]
        for got, want in zip(_contiguous_slots(plan.segments, seg, pos), general):
            assert np.array_equal(got, want), (seg_lens, plan.row_len)


def test_variable_length_attention_is_taken_only_on_a_real_gpu_in_half_precision():
    """varlen_attn is CUDA-only: off a GPU (and under the strict mode, whose 'cuda' tensors keep their data
    on the host) the packed attention takes the re-padded path, whatever the dtype."""
    from liteppo_mcore.models.layers import varlen_applies

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert varlen_applies(torch.zeros(4, 2, 8, dtype=dtype)) is False
