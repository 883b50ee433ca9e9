"""Model FLOPs in Megatron's convention: hand-computed values for a tiny shape, and the H200 baselines."""

import math

import pytest

from liteppo_mcore.models.shapes import ModelShape
from liteppo_mcore.utils.flops import layer_matmul_params, mfu, model_flops_per_token, tflops_per_second, train_flops


def _shape(**kw) -> ModelShape:
    base = dict(family="qwen2", num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                num_query_groups=1, head_dim=4, vocab_size=100, max_position_embeddings=64, rope_theta=1e4,
                norm_epsilon=1e-6, tie_word_embeddings=True)
    base.update(kw)
    return ModelShape(**base)


QWEN25_1P5B = _shape(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                     num_query_groups=2, head_dim=128, vocab_size=151936, max_position_embeddings=32768)


def test_tiny_shape_by_hand():
    s = _shape()
    # qkv 8 x (8 + 2*4) = 128, proj 8 x 8 = 64, fc1 8 x 2*16 = 256, fc2 16 x 8 = 128
    assert layer_matmul_params(s) == 576
    # dense: 2 layers x 576 + output 8 x 128 (vocab 100 padded to 128) = 2176 -> 4352 FLOPs;
    # attention at s = 10: 2 layers x 2 x 2 x 10 x (2 heads x 4) = 640
    assert model_flops_per_token(s, 10) == 4352 + 640
    assert model_flops_per_token(s, 10, vocab=100) == 2 * (1152 + 800) + 640
    # each sequence's attention uses its own length: 3 x (10 x 4992 + 5 x (4352 + 320))
    assert train_flops(s, [10]) == 3 * 10 * 4992
    assert train_flops(s, [10, 5]) == 3 * (10 * 4992 + 5 * 4672)
    assert train_flops(s, []) == 0.0
    # grouped-query attention shrinks only the K/V part of the QKV projection
    assert layer_matmul_params(_shape(num_query_groups=2)) == 576 + 2 * 8 * 4


def test_mfu_and_rates():
    assert tflops_per_second(3e12, 2.0) == 1.5
    assert math.isclose(mfu(3e12, 2.0, 750.0), 0.002)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        model_flops_per_token(_shape(), -1)


@pytest.mark.parametrize("micro_batch, seconds, measured_tflops", [
    (1, 0.282, 165.0),  # stock local spec
    (1, 0.159, 293.0),  # SDPA core attention
    (2, 0.237, 394.0),
    (4, 0.465, 401.0),
])
def test_reproduces_the_h200_baselines(micro_batch, seconds, measured_tflops):
    """Qwen2.5-1.5B at seq 4096, forward+backward: the figures measured on the H200 within 1%
    (logits layer over the vocabulary and GQA's K/V width counted, attention not halved)."""
    flops = train_flops(QWEN25_1P5B, [4096] * micro_batch)
    assert math.isclose(model_flops_per_token(QWEN25_1P5B, 4096), 3.7918e9, rel_tol=1e-4)
    assert math.isclose(tflops_per_second(flops, seconds), measured_tflops, rel_tol=0.01)
    assert math.isclose(mfu(flops, seconds, 763.0), measured_tflops / 763.0, rel_tol=0.01)
