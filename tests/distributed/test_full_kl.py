"""kl_penalty: full: the exact per-token KL(policy || reference) over the whole vocabulary, computed from
both models' logits, equals a plain full-softmax computation, at TP=1 and TP=2 (and CP=2)."""

import torch

from tests.distributed.spawn import run_gloo
from tests.distributed.test_model_layouts import BASE, VOCAB, make_batch

T = 0.7


def kl_worker(rank, ws, layouts, wholes=None):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import forward_full_kl
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    out = {}
    for name, overrides in layouts:
        cfg = load_config(overrides=BASE + overrides, world_size=ws)
        groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
        models = build_models(cfg, groups)
        if wholes is None:  # one process: draw the reference as the actor plus noise
            g = torch.Generator().manual_seed(5)
            actor = whole_state_dict(models.actor, groups, VOCAB)
            wholes = {"actor": actor, "reference": {k: v + 0.05 * torch.randn(v.shape, generator=g)
                                                    for k, v in actor.items()}}
        load_whole_state_dict(models.actor, wholes["actor"], groups, VOCAB)
        load_whole_state_dict(models.reference, wholes["reference"], groups, VOCAB)
        batch = make_batch()
        kl = forward_full_kl(models.actor, models.reference, batch, groups, temperature=T, vocab_size=VOCAB,
                             micro_batch_size=3, sequence_parallel=False)
        same = forward_full_kl(models.actor, models.actor, batch, groups, temperature=T, vocab_size=VOCAB,
                               micro_batch_size=4)
        plain = None
        if cfg.parallel.tp == 1 and cfg.parallel.cp == 1:
            tokens = batch.tokens.to(next(models.actor.parameters()).device)
            lp = torch.log_softmax(models.actor(tokens, None, attention_mask=None)[..., :VOCAB] / T, -1)
            lq = torch.log_softmax(models.reference(tokens, None, attention_mask=None)[..., :VOCAB] / T, -1)
            full = (lp.exp() * (lp - lq)).sum(-1).cpu()
            from liteppo_mcore.models.forward import to_response_coords
            plain = to_response_coords(full.detach(), batch, batch.response_width())
        out[name] = {"kl": kl, "same": same, "plain": plain, "wholes": wholes}
        destroy_model_parallel()
    return out


def test_full_kl_matches_a_plain_computation_at_every_layout():
    (one,) = run_gloo(kl_worker, 1, [("tp1", [])], timeout=240)
    ref = one["tp1"]
    mask = ref["plain"] != 0
    assert mask.sum() > 10 and (ref["kl"][mask] > 0).all()
    assert torch.allclose(ref["kl"], ref["plain"], atol=2e-6, rtol=1e-4)
    assert ref["same"].abs().max() < 2e-6  # KL of a model with itself
    two = run_gloo(kl_worker, 2, [("tp2", ["parallel.tp=2"]), ("cp2", ["parallel.cp=2"])], ref["wholes"],
                   timeout=300)
    for rank_result in two:
        for name in ("tp2", "cp2"):
            assert torch.allclose(rank_result[name]["kl"], ref["plain"], atol=2e-6, rtol=1e-4), name
