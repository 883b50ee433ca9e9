"""Model pieces that need no process group: spec choice, shapes from HF configs, CP split, labels."""

import pytest
import torch

from liteppo_mcore.config import load_config
from liteppo_mcore.models.forward import SequenceBatch, cp_split, shifted_labels_and_mask, to_response_coords
from liteppo_mcore.models.shapes import ModelShapeError, resolve_shape, shape_from_hf_config
from liteppo_mcore.models.spec import choose_backend

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
         "num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 28, "vocab_size": 151936,
         "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "max_position_embeddings": 32768}


def test_backend_choice():
    assert choose_backend("auto", 1, te_importable=True) == "te"
    assert choose_backend("auto", 2, te_importable=False) == "sdpa"
    assert choose_backend("local", 1, te_importable=False) == "local"
    with pytest.raises(ValueError, match="transformer_engine is not importable"):
        choose_backend("te", 1, te_importable=False)
    with pytest.raises(ValueError, match="local does not support context parallelism"):
        choose_backend("local", 2, te_importable=False)


def test_hf_shapes_per_family():
    q2 = shape_from_hf_config(QWEN2)
    assert (q2.family, q2.qkv_bias, q2.qk_norm, q2.head_dim, q2.num_query_groups) == ("qwen2", True, False, 128, 2)
    assert q2.tie_word_embeddings and q2.padded_vocab_size(tp=1) == 151936 and q2.padded_vocab_size(tp=4) == 152064
    q3 = shape_from_hf_config({**QWEN2, "architectures": ["Qwen3ForCausalLM"], "head_dim": 96})
    assert (q3.family, q3.qkv_bias, q3.qk_norm, q3.head_dim) == ("qwen3", False, True, 96)
    llama = shape_from_hf_config({**QWEN2, "architectures": ["LlamaForCausalLM"], "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert llama.family == "llama" and not llama.qkv_bias and llama.rope_scaling["factor"] == 8.0


def test_hf_shape_errors(tmp_path):
    with pytest.raises(ModelShapeError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported. "
                                              r"Supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        shape_from_hf_config({**QWEN2, "architectures": ["GPT2LMHeadModel"]})
    broken = dict(QWEN2)
    del broken["intermediate_size"]
    with pytest.raises(ModelShapeError, match="missing field `intermediate_size`"):
        shape_from_hf_config(broken)
    cfg = load_config(overrides=[f"model.hf_path={tmp_path}"])
    with pytest.raises(ModelShapeError, match="no config.json there"):
        resolve_shape(cfg.model)
    with pytest.raises(ModelShapeError, match="model.vocab_size is null"):
        resolve_shape(load_config().model)
    with pytest.raises(ModelShapeError, match="parallel.tp=3 must divide the 2 key/value heads"):
        shape_from_hf_config(QWEN2).check_layout(tp=3, pp=1)


def test_labels_are_shifted_before_the_cp_split():
    # one sequence of 8 tokens: prompt 3, response 5; cp=2 -> chunks of 2: rank 0 holds [0,1] and [6,7]
    batch = SequenceBatch(tokens=torch.arange(10, 18)[None], prompt_lens=torch.tensor([3]),
                          response_lens=torch.tensor([5]))
    tokens, labels, mask = shifted_labels_and_mask(batch, 8)
    assert labels[0, :7].tolist() == list(range(11, 18))
    assert mask[0].tolist() == [False, False, True, True, True, True, True, False]
    rank0 = cp_split(labels, 0, 2)
    rank1 = cp_split(labels, 1, 2)
    # position 1 is the last of rank 0's first chunk: its label is token 2, which lives on rank 1
    assert rank0[0].tolist() == [11, 12, 17, 0]
    assert rank1[0].tolist() == [13, 14, 15, 16]
    # shifting after the split (the classic bug) would label position 1 with rank 0's next local token
    local_tokens = cp_split(tokens, 0, 2)[0]
    assert local_tokens.tolist() == [10, 11, 16, 17]
    assert local_tokens[2].item() != rank0[0, 1].item()


def test_response_coordinates():
    batch = SequenceBatch(tokens=torch.zeros(2, 6, dtype=torch.long), prompt_lens=torch.tensor([2, 1]),
                          response_lens=torch.tensor([3, 1]))
    full = torch.arange(12, dtype=torch.float32).view(2, 6)
    out = to_response_coords(full, batch, 3)
    assert out.tolist() == [[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]]
