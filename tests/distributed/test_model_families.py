"""Each supported family builds at TP=2 and gives finite outputs; the critic's values have the right
shape and carry gradients."""

import torch

from tests.distributed.spawn import run_gloo

FAMILIES = {
    "qwen2": ["model.family=qwen2"],
    "qwen3": ["model.family=qwen3"],
    "llama": ["model.family=llama", "model.tie_word_embeddings=false", "model.rope_theta=500000",
              "model.attention_backend=local", "train.pack_sequences=false",
              "model.rope_scaling={factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
              "original_max_position_embeddings: 64}"],
}


def families_worker(rank, ws):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.device import compute_device
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    out = {}
    for family, overrides in FAMILIES.items():
        cfg = load_config(overrides=overrides + ["parallel.tp=2", "model.vocab_size=77", "adv_estimator=gae",
                                                 "model.max_position_embeddings=256"], world_size=ws)
        groups = initialize_model_parallel(2, 1, 1, seed=cfg.seed)
        models = build_models(cfg, groups)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 77, (2, 12), generator=g)
        batch = SequenceBatch(tokens=tokens, prompt_lens=torch.tensor([4, 5]), response_lens=torch.tensor([8, 3]))
        actor = forward_per_token(models.actor, batch, groups, vocab_size=77, micro_batch_size=1)
        values = models.critic(tokens.to(compute_device()), None, attention_mask=None)
        values.sum().backward()
        head = models.critic.output_layer
        qk_norms = [n for n, _ in models.actor.named_parameters() if "q_layernorm" in n]
        out[family] = {
            "finite": bool(torch.isfinite(actor["logp"]).all() and torch.isfinite(actor["entropy"]).all()),
            "logp_max": float(actor["logp"].max()), "values_shape": tuple(values.shape),
            "head_grad": float(head.weight.grad.abs().sum()), "qk_norm": bool(qk_norms),
            "qkv_bias": any(n.endswith("linear_qkv.bias") for n, _ in models.actor.named_parameters()),
            "has_reference": models.reference is not None,
        }
        destroy_model_parallel()
    return out


def test_families_build_at_tp2():
    results = run_gloo(families_worker, 2, timeout=300)
    for rank_result in results:
        for family, r in rank_result.items():
            assert r["finite"] and r["logp_max"] <= 0.0, family
            assert r["values_shape"] == (2, 12, 1), family
            assert r["head_grad"] > 0, family
            assert r["has_reference"], family  # use_kl_loss defaults to true
        assert rank_result["qwen2"]["qkv_bias"] and not rank_result["qwen2"]["qk_norm"]
        assert rank_result["qwen3"]["qk_norm"] and not rank_result["qwen3"]["qkv_bias"]
        assert not rank_result["llama"]["qk_norm"] and not rank_result["llama"]["qkv_bias"]


def backends_worker(rank, ws):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    logps, whole = {}, None
    g = torch.Generator().manual_seed(1)
    batch = SequenceBatch(torch.randint(0, 50, (2, 10), generator=g), torch.tensor([3, 4]), torch.tensor([7, 6]))
    for backend in ("sdpa", "local"):
        # sdpa packed (the default), megatron's local attention padded (it takes no packed sequences)
        cfg = load_config(overrides=["model.vocab_size=50", f"model.attention_backend={backend}",
                                     "use_kl_loss=false", "adv_estimator=reinforce",
                                     f"train.pack_sequences={'true' if backend == 'sdpa' else 'false'}"])
        groups = initialize_model_parallel(1, 1, 1)
        actor = build_models(cfg, groups).actor
        if whole is None:
            whole = whole_state_dict(actor, groups, 50)
        else:
            load_whole_state_dict(actor, whole, groups, 50)
        logps[backend] = forward_per_token(actor, batch, groups, vocab_size=50, micro_batch_size=2,
                                           pack=cfg.train.pack_sequences)["logp"]
        destroy_model_parallel()
    return logps


def test_sdpa_and_megatron_local_attention_agree():
    (logps,) = run_gloo(backends_worker, 1, timeout=120)
    assert torch.count_nonzero(logps["sdpa"]) == 13  # 7 + 6 response tokens
    assert (logps["sdpa"] - logps["local"]).abs().max() < 1e-5
