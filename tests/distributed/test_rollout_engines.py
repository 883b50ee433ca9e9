"""The hf and mcore engines against the megatron actor, in two processes (TP=2, PP=2, CP=2 and DP=2).

After an update (noise added to the actor, then a sync through the exporter), the hf engine's logits
equal the actor's; greedy generation of both engines equals a plain greedy decode with the actor; the
log-probs both engines return for sampled tokens equal the trainer's recomputation
(`forward_per_token`); the weight check passes, and fails naming the tensor when one is changed.
"""

import torch

from tests.distributed.spawn import run_gloo
from tests.distributed.test_rollout_export import BASE, VOCAB, build_actor, perturb

LAYOUTS = {
    "tp2": ["model.family=qwen2", "model.tie_word_embeddings=true", "parallel.tp=2"],
    "pp2": ["model.family=qwen3", "model.tie_word_embeddings=false", "parallel.pp=2"],
    "dp2": ["model.family=llama", "model.tie_word_embeddings=false"],
    "cp2": ["model.family=qwen2", "model.tie_word_embeddings=false", "parallel.cp=2"],
}
PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14], [1, 3]]
TEMPERATURE = 0.7
MAX_NEW = 6
assert BASE and VOCAB == 100


@torch.no_grad()
def actor_logits(actor, groups, tokens):
    """Full-vocabulary logits [B, S, V] of the actor (pp=1 layouts): TP shards gathered, padding cut."""
    import torch.distributed as dist

    actor.eval()
    shard = actor(tokens.to(next(actor.parameters()).device), None, attention_mask=None)
    if groups.tp_size > 1:
        parts = [torch.empty_like(shard) for _ in range(groups.tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=groups.tp_group)
        shard = torch.cat(parts, dim=-1)
    return shard[..., :VOCAB].float().cpu()


def reference_greedy(actor, groups, prompt, max_new, stop=None):
    """The plainest greedy decode: the whole sequence through the actor, argmax of the last position."""
    seq = list(prompt)
    for _ in range(max_new):
        tok = int(actor_logits(actor, groups, torch.tensor([seq]))[0, -1].argmax())
        seq.append(tok)
        if tok == stop:
            break
    return seq[len(prompt):]


def trainer_logp(models, groups, prompts, gens, micro):
    """The trainer's recomputation of the engine's responses: [N, T] log-probs and mask."""
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token

    rows = [(p, g) for p, gs in zip(prompts, gens) for g in gs]
    width = max(len(p) + len(g.token_ids) for p, g in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, g) in enumerate(rows):
        tokens[i, : len(p) + len(g.token_ids)] = torch.tensor(p + g.token_ids)
    batch = SequenceBatch(tokens, torch.tensor([len(p) for p, _ in rows]),
                          torch.tensor([len(g.token_ids) for _, g in rows]))
    logp = forward_per_token(models.actor, batch, groups, temperature=TEMPERATURE, vocab_size=VOCAB,
                             micro_batch_size=micro, compute_entropy=False)["logp"]
    rollout = torch.zeros_like(logp)
    for i, (_, g) in enumerate(rows):
        rollout[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    mask = torch.arange(logp.shape[1])[None, :] < batch.response_lens[:, None]
    return rollout, logp, mask


def _sync_and_check_weights(models, groups, engine, layout):
    """Sync at the initial weights, change the actor, sync again; returns the exporter and results."""
    from liteppo_mcore.rollout.exporter import WeightExporter
    from liteppo_mcore.rollout.metrics import WeightSyncError, check_weights_equal

    exporter = WeightExporter(models.actor, groups, models.shape, bucket_bytes=64 * 1024)
    engine.update_weights(exporter.buckets())
    perturb(models.actor, groups, scale=0.1)  # the "update"
    engine.update_weights(exporter.buckets())
    out = {"compared": check_weights_equal(engine, exporter), "caught": None}
    if layout == "tp2":
        name = "model.layers.1.mlp.up_proj.weight"
        if engine.model is not None:
            engine.get_weight(name)[3, 4] += 1e-3
        try:
            check_weights_equal(engine, exporter)
        except WeightSyncError as err:
            out["caught"] = str(err)
        engine.update_weights(exporter.buckets())  # repaired by the next sync
        check_weights_equal(engine, exporter)
    return out


def _layout_run(ws, layout, overrides):
    from liteppo_mcore.parallel.mcore import destroy_model_parallel
    from liteppo_mcore.rollout.engine import SamplingParams
    from liteppo_mcore.rollout.hf_engine import HFEngine
    from liteppo_mcore.rollout.mcore_engine import MCoreEngine
    from liteppo_mcore.rollout.metrics import logprob_abs_diff

    cfg, models, groups = build_actor(ws, overrides)
    eos = [2]
    hf = HFEngine(models.shape, groups, eos_token_ids=eos, dtype=torch.float32, attn_implementation="eager")
    mc = MCoreEngine(models.actor, groups, vocab_size=VOCAB, eos_token_ids=eos, max_sequence_length=128)
    res = _sync_and_check_weights(models, groups, hf, layout)
    prompts = PROMPTS if layout != "dp2" else PROMPTS[groups.dp_rank::2]
    if groups.pp_size == 1 and groups.cp_size == 1:
        tokens = torch.tensor([PROMPTS[1] + [4, 8, 15, 16, 23, 42]])
        want = actor_logits(models.actor, groups, tokens)
        got = hf.logits(tokens)
        res["logit_diff"] = None if got is None else (got.cpu() - want).abs().max().item()
        free = reference_greedy(models.actor, groups, prompts[0], MAX_NEW)
        stop = next(t for i, t in enumerate(free) if i > 0 and t not in free[:i])  # a stop the decode meets
        res["stop"] = stop
        res["reference"] = [reference_greedy(models.actor, groups, p, MAX_NEW, stop) for p in prompts]
    else:
        stop = 2
    greedy = SamplingParams(temperature=TEMPERATURE, max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=(stop,))
    sample = SamplingParams(temperature=TEMPERATURE, top_p=1.0, max_new_tokens=MAX_NEW, n=2, seed=11)
    for name, engine in (("hf", hf), ("mcore", mc)):
        res[f"{name}-greedy"] = [gs[0].token_ids for gs in engine.generate(prompts, greedy)]
        gens = engine.generate(prompts, sample)
        res[f"{name}-sample"] = [[(g.token_ids, g.finish_reason) for g in gs] for gs in gens]
        rollout, trainer, mask = trainer_logp(models, groups, prompts, gens, micro=1)
        res[f"{name}-maxdiff"] = ((rollout - trainer).abs() * mask).max().item()
        res[f"{name}-metric"] = logprob_abs_diff(rollout, trainer, mask, groups=groups)
        res[f"{name}-tokens"] = int(mask.sum())
    res["dp_rank"] = groups.dp_rank
    hf.shutdown()
    destroy_model_parallel()
    return res


def engines_worker(rank, ws):
    return {layout: _layout_run(ws, layout, overrides) for layout, overrides in LAYOUTS.items()}


def test_engines_match_the_actor_in_two_process_layouts():
    results = run_gloo(engines_worker, 2, timeout=600)
    for layout in LAYOUTS:
        by_rank = [r[layout] for r in results]
        for rank, r in enumerate(by_rank):
            where = f"{layout}, rank {rank}"
            assert r["compared"] > 0 if (layout == "dp2" or rank == 0) else r["compared"] == 0, where
            for name in ("hf", "mcore"):
                assert r[f"{name}-tokens"] > 0, where
                assert r[f"{name}-maxdiff"] <= 1e-4, f"{where}: {name} log-probs differ by {r[f'{name}-maxdiff']:.2e}"
                assert r[f"{name}-metric"] <= 1e-5, where
            assert r["hf-greedy"] == r["mcore-greedy"], where
            if "reference" in r:
                assert r["mcore-greedy"] == r["reference"], where
                assert any(seq[-1] == r["stop"] and len(seq) < MAX_NEW for seq in r["reference"]), where
                if r["logit_diff"] is not None:
                    assert r["logit_diff"] <= 1e-4, (f"{where}: hf logits differ from the actor's by "
                                                     f"{r['logit_diff']:.2e}")
            for name in ("hf", "mcore"):
                lengths = {len(t) for gs in r[f"{name}-sample"] for t, _ in gs}
                assert lengths, where
        if layout == "tp2":
            assert by_rank[0]["caught"] and "model.layers.1.mlp.up_proj.weight" in by_rank[0]["caught"]
            assert by_rank[1]["caught"] == by_rank[0]["caught"]  # every rank raises the same error
        if layout != "dp2":  # ranks of one replica return identical generations
            for key in ("hf-greedy", "mcore-greedy", "hf-sample", "mcore-sample"):
                assert by_rank[0][key] == by_rank[1][key], (layout, key)
        else:
            assert {r["dp_rank"] for r in by_rank} == {0, 1}
            assert by_rank[0]["hf-metric"] == by_rank[1]["hf-metric"]  # a global mean over both DP ranks
