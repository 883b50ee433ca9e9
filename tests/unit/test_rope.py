"""models/rope.py: the packed rows' rotary embedding equals megatron-core's own THD function, at every CP
rank, and without reading cu_seqlens back to the host."""

from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from liteppo_mcore.models import rope
from liteppo_mcore.models.packing import PackPlan, packed_seq_params


class _Group:
    """What megatron's THD rotary embedding asks of a CP group."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _config(**kw):
    return SimpleNamespace(apply_rope_fusion=False, multi_latent_attention=False, rotary_interleaved=False, **kw)


@pytest.mark.parametrize("cp,rot_dim", [(1, 8), (2, 8), (2, 4)])
def test_packed_rope_equals_megatrons_thd(cp, rot_dim):
    plan = PackPlan(rows=torch.tensor([0, 1, 2]), seg_lens=(12, 4, 8), row_len=28)  # + a padding segment of 4
    g = torch.Generator().manual_seed(cp)
    freqs = torch.randn(12, 1, 1, rot_dim, generator=g)  # longest segment x rot_dim, as GPTModel passes them
    for rank in range(cp):
        params = packed_seq_params(plan, torch.device("cpu"), rank, cp)
        cu = params.cu_seqlens_q_padded
        t = torch.randn(28 // cp, 3, 8, generator=g, dtype=torch.float64)
        want = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs.double(), cp_group=_Group(rank, cp))
        got = rope.apply_rotary_pos_emb(t, freqs.double(), _config(), cu_seqlens=cu, cp_group=_Group(rank, cp))
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        # the second call (the keys, the next layers) reuses the cosines of the first
        again = rope.apply_rotary_pos_emb(t * 2, freqs.double(), _config(), cu_seqlens=cu)
        assert torch.allclose(again, 2 * want, atol=1e-12)


def test_packed_rope_never_reads_cu_seqlens():
    plan = PackPlan(rows=torch.tensor([0, 1]), seg_lens=(6, 2), row_len=8)
    cu = packed_seq_params(plan, torch.device("cpu")).cu_seqlens_q
    freqs = torch.randn(6, 1, 1, 4)
    t = torch.randn(8, 2, 4)
    want = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_Group(0, 1))
    cu.zero_()  # megatron's function would now cut the row at the wrong places; ours reads the positions
    assert torch.allclose(rope.apply_rotary_pos_emb(t, freqs, _config(), cu_seqlens=cu), want, atol=1e-6)


def test_anything_else_goes_to_megatron(monkeypatch):
    seen = []
    monkeypatch.setattr(rope, "_MEGATRON", lambda *a, **k: seen.append(k) or "megatron")
    t, freqs = torch.randn(4, 2, 4), torch.randn(4, 1, 1, 4)
    assert rope.apply_rotary_pos_emb(t, freqs, _config()) == "megatron"  # padded rows: no cu_seqlens
    cu = torch.tensor([0, 4], dtype=torch.int32)  # cu_seqlens from elsewhere: no positions attached
    assert rope.apply_rotary_pos_emb(t, freqs, _config(), cu_seqlens=cu) == "megatron"
    plan = PackPlan(rows=torch.tensor([0]), seg_lens=(4,), row_len=4)
    ours = packed_seq_params(plan, torch.device("cpu")).cu_seqlens_q
    cfg = _config()
    cfg.apply_rope_fusion = True
    assert rope.apply_rotary_pos_emb(t, freqs, cfg, cu_seqlens=ours) == "megatron"
    assert len(seen) == 3


def test_install_routes_megatrons_attention_and_refuses_a_foreign_patch(monkeypatch):
    from megatron.core.transformer import attention

    monkeypatch.setattr(attention, "apply_rotary_pos_emb", rope._MEGATRON)
    rope.install()
    assert attention.apply_rotary_pos_emb is rope.apply_rotary_pos_emb
    rope.install()  # idempotent
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="is not megatron-core's own"):
        rope.install()
