"""The actor's log-probs from its last hidden states (models/output_head.py + the fused log-prob) against
megatron's own output layer (the whole logits): values, entropy and the gradient of every parameter,
the output weight included, tied and untied, at TP=1, TP=2 and TP=2 with sequence parallelism, and the
full KL of two models from their hidden states against the KL of their logits."""

import pytest
import torch

from tests.distributed.spawn import run_gloo

VOCAB = 100  # not a multiple of 128: the padded vocabulary columns must stay out
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64",
        "model.dtype=fp32"]
TEMPERATURE = 0.7
TOL = 1e-6


def _batch(groups):
    from liteppo_mcore.models.forward import SequenceBatch, shifted_labels_and_mask

    g = torch.Generator().manual_seed(0)
    prompt_lens, response_lens = torch.tensor([3, 6, 2, 5]), torch.tensor([9, 1, 12, 6])
    seq_len = 16  # a multiple of tp for sequence parallelism
    tokens = torch.randint(0, VOCAB, (4, seq_len), generator=g)
    from liteppo_mcore.parallel.device import compute_device

    built = shifted_labels_and_mask(SequenceBatch(tokens, prompt_lens, response_lens), seq_len)
    return tuple(x.to(compute_device()) for x in built)


def _pass(model, groups, tokens, labels, mask, *, fused):
    from liteppo_mcore.models.logprob import logprob_entropy_at
    from liteppo_mcore.models.output_head import hidden_states_out, used_weight

    model.zero_grad(set_to_none=True)
    with hidden_states_out(model, enabled=fused) as layer:
        output = model(tokens, None, attention_mask=None)
    weight = used_weight(layer) if fused else None
    v_local = weight.shape[0] if fused else output.shape[-1]
    logp, ent = logprob_entropy_at(output, labels, mask, weight=weight, tp_group=groups.tp_group,
                                   temperature=TEMPERATURE, vocab_start=groups.tp_rank * v_local, vocab_size=VOCAB,
                                   compute_entropy=True, entropy_grad=True)
    coef = torch.linspace(-1, 1, mask.numel(), device=mask.device).reshape(mask.shape)
    ((logp * coef).sum() + 0.3 * (ent * coef.flip(0)).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"logp": logp.detach(), "ent": ent.detach(), "grads": grads, "out_width": output.shape[-1]}


def _worker(rank, world_size, overrides):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import SequenceBatch, forward_full_kl
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    cfg = load_config(overrides=BASE + overrides, world_size=world_size)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    model = build_models(cfg, groups).actor
    tokens, labels, mask = _batch(groups)
    plain = _pass(model, groups, tokens, labels, mask, fused=False)
    fused = _pass(model, groups, tokens, labels, mask, fused=True)
    plain, fused = ({k: (v.cpu() if torch.is_tensor(v) else {n: g.cpu() for n, g in v.items()} if isinstance(v, dict)
                         else v) for k, v in r.items()} for r in (plain, fused))
    mask = mask.cpu()
    out = {"logp": (fused["logp"] - plain["logp"]).abs().max().item(),
           "ent": (fused["ent"] - plain["ent"]).abs().max().item(),
           "grad_names": sorted(plain["grads"]) == sorted(fused["grads"]),
           "grads": {n: ((fused["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                     for n, g in plain["grads"].items()},
           "widths": (plain["out_width"], fused["out_width"]), "ent_mean": plain["ent"][mask].mean().item()}

    # full KL of the model against a perturbed copy: from hidden states (forward_full_kl) vs whole logits
    other = build_models(cfg, groups).actor
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
            q.copy_(p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device))
    from liteppo_mcore.models.logprob import vocab_parallel_full_kl

    with torch.no_grad():
        lp, lq = model(tokens, None, attention_mask=None), other(tokens, None, attention_mask=None)
        want = vocab_parallel_full_kl(lp[mask], lq[mask], tp_group=groups.tp_group, temperature=TEMPERATURE,
                                      vocab_start=groups.tp_rank * lp.shape[-1], vocab_size=VOCAB)
    batch = SequenceBatch(tokens.cpu(), torch.tensor([3, 6, 2, 5]), torch.tensor([9, 1, 12, 6]))
    got = forward_full_kl(model, other, batch, groups, temperature=TEMPERATURE, vocab_size=VOCAB,
                          micro_batch_size=4, sequence_parallel=cfg.parallel.sequence_parallel)
    from liteppo_mcore.models.forward import to_response_coords

    full = torch.zeros(mask.shape)
    full[mask.cpu()] = want.float().cpu()
    want_resp = to_response_coords(full, batch, got.shape[1])
    out["kl"] = (got - want_resp).abs().max().item()
    out["kl_mean"] = want.mean().item()
    destroy_model_parallel()
    return out


LAYOUTS = {"tp1": (1, []), "tp1-untied": (1, ["model.tie_word_embeddings=false"]),
           "tp2": (2, ["parallel.tp=2"]), "tp2-untied": (2, ["parallel.tp=2", "model.tie_word_embeddings=false"]),
           "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"])}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hidden_states_path_equals_megatrons_output_layer(name):
    world_size, overrides = LAYOUTS[name]
    for rank, out in enumerate(run_gloo(_worker, world_size, overrides, timeout=240)):
        assert out["widths"][1] == 64 and out["widths"][0] != 64, out["widths"]  # hidden states vs logits
        assert out["logp"] < TOL and out["ent"] < TOL, (rank, out["logp"], out["ent"])
        assert out["ent_mean"] > 0.5  # a real distribution, not a degenerate one
        assert out["grad_names"], rank
        worst = max(out["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, worst)
        assert any("output_layer" in n or "word_embeddings" in n for n in out["grads"])
        assert out["kl"] < 5e-6 and out["kl_mean"] > 1e-3, (rank, out["kl"], out["kl_mean"])
