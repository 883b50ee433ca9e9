"""Packed attention on a GPU: torch's variable-length flash attention (`models/layers.varlen_attention`,
what SDPACoreAttention takes on CUDA in bf16/fp16 without CP) equals the re-padded path that runs
everywhere else (`_slot_attention`), outputs and gradients, on a row of ragged segments with a padding
tail and grouped-query keys."""

import pytest

from tests.gpu import helpers as H

pytestmark = H.gpu_marks(cuda_only=True)

# bf16 attention outputs are ~1 in size here; two kernels with different blockings round differently
# (2^-8 relative per product), so they agree to a few 1e-2 at worst, about 1e-3 on average.
MAX_ABS, MEAN_ABS = 3e-2, 3e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_varlen_attention_equals_the_slot_path(dtype):
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from liteppo_mcore.models.layers import SDPACoreAttention, varlen_applies, varlen_attention
    from liteppo_mcore.models.packing import PackPlan, packed_seq_params

    config = TransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0)
    attn = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    plan = PackPlan(rows=torch.tensor([0, 1, 2, 3]), seg_lens=(93, 77, 1, 64), row_len=256)
    device, dt = torch.device("cuda"), getattr(torch, dtype)
    params = packed_seq_params(plan, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(256, h, 64, generator=g, device=device, dtype=dt, requires_grad=True)
               for h in (4, 2, 2))
    assert varlen_applies(q)
    w_out = torch.randn(256, 1, 256, generator=g, device=device, dtype=dt)
    results = []
    for path in (lambda: varlen_attention(q, k, v, params, None),
                 lambda: attn._slot_attention(q, k, v, params, plan, 1)):
        out = path()
        results.append((out, *torch.autograd.grad((out * w_out).float().sum(), (q, k, v))))
    report = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[0], results[1]):
        diff = (got.float() - want.float()).abs()
        report[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    H.write_report(f"packed_attention_varlen_{dtype}", report)
    for name, r in report.items():
        assert r["max_abs"] <= MAX_ABS and r["mean_abs"] <= MEAN_ABS, (name, r)
