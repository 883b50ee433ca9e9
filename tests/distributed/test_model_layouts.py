"""Layout invariance of the megatron-core models on CPU/gloo: the same weights and batch give the
same per-token log-probs, entropy and values under TP, PP, CP, DP and their mixes as in one process."""

import pytest
import torch

from tests.distributed.spawn import run_gloo

VOCAB = 100  # not a multiple of 128: the vocabulary is padded differently per TP size
BASE = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=128",
        "rollout_batch_size=4", "num_return_sequences_in_group=2", "train.mini_batch_size=8",
        "train.micro_batch_size=1", "adv_estimator=gae", "use_kl_loss=true", "train.max_tokens_per_micro_batch=24",
        "prompt_length=8", "response_length=12"]
TEMPERATURE = 0.7
TOL = 1e-5
# The references and most layouts run packed (train.pack_sequences, the default; at most 24 tokens per row,
# so a row holds one to three sequences); these named so run padded.
PADDED = "train.pack_sequences=false"


def make_batch(seed=0, n=4):
    from liteppo_mcore.models.forward import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 9, (n,), generator=g)
    response_lens = torch.randint(1, 12, (n,), generator=g)
    response_lens[0] = 1  # a response of one token
    s = int((prompt_lens + response_lens).max())
    tokens = torch.zeros(n, s, dtype=torch.long)
    for i in range(n):
        length = int(prompt_lens[i] + response_lens[i])
        tokens[i, :length] = torch.randint(0, VOCAB, (length,), generator=g)
    return SequenceBatch(tokens=tokens, prompt_lens=prompt_lens, response_lens=response_lens)


def _run_layout(ws, overrides, wholes=None):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    cfg = load_config(overrides=BASE + overrides, world_size=ws)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    models = build_models(cfg, groups)
    if wholes is not None:
        load_whole_state_dict(models.actor, wholes["actor"], groups, VOCAB)
        load_whole_state_dict(models.reference, wholes["actor"], groups, VOCAB)
        load_whole_state_dict(models.critic, wholes["critic"], groups, VOCAB)
    elif groups.is_last_stage:
        # the value head starts at zero; give it weights so that values are a real check
        head = models.critic.output_layer.weight
        head.data.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    # each DP rank takes its share of the batch (whole sequences)
    batch = make_batch()
    if groups.dp_size > 1:
        from liteppo_mcore.models.forward import SequenceBatch
        sl = slice(groups.dp_rank * batch.size // groups.dp_size, (groups.dp_rank + 1) * batch.size // groups.dp_size)
        batch = SequenceBatch(batch.tokens[sl], batch.prompt_lens[sl], batch.response_lens[sl])
    kw = dict(vocab_size=VOCAB, micro_batch_size=2, sequence_parallel=cfg.parallel.sequence_parallel,
              pack=cfg.train.pack_sequences, max_tokens_per_micro_batch=cfg.micro_batch_tokens)
    out = forward_per_token(models.actor, batch, groups, temperature=TEMPERATURE, **kw)
    out.update(forward_per_token(models.critic, batch, groups, kind="critic", **kw))
    ref = forward_per_token(models.reference, batch, groups, temperature=TEMPERATURE, compute_entropy=False, **kw)
    out["ref_logp"] = ref["logp"]
    out["dp_rank"] = groups.dp_rank
    if wholes is None:
        out["wholes"] = {"actor": whole_state_dict(models.actor, groups, VOCAB),
                         "critic": whole_state_dict(models.critic, groups, VOCAB)}
    destroy_model_parallel()
    return out


def reference_worker(rank, ws, extras):
    return {tuple(extra): _run_layout(ws, extra) for extra in extras}


def layouts_worker(rank, ws, layouts, wholes_by_extra):
    results = {}
    for name, overrides, extra in layouts:
        results[name] = _run_layout(ws, overrides + extra, wholes_by_extra[tuple(extra)])
    return results


def _compare(name, got_by_rank, ref):
    shares = {}  # ranks of one DP replica hold identical results; keep one per DP rank, in DP order
    for res in got_by_rank:
        shares.setdefault(res["dp_rank"], res)
    for key in ("logp", "entropy", "values", "ref_logp"):
        parts = [shares[d][key] for d in sorted(shares)]
        wide = max(p.shape[1] for p in parts)
        got = torch.cat([torch.nn.functional.pad(p, (0, wide - p.shape[1])) for p in parts], dim=0)
        want = ref[key]
        width = min(got.shape[1], want.shape[1])
        assert torch.count_nonzero(got[:, width:]) == 0 and torch.count_nonzero(want[:, width:]) == 0
        diff = (got[:, :width] - want[:, :width]).abs().max().item()
        assert diff <= TOL, f"{name}: {key} differs from the single-process result by {diff:.2e}"


@pytest.fixture(scope="module")
def references():
    (refs,) = run_gloo(reference_worker, 1, [[], ["model.tie_word_embeddings=false"]], timeout=240)
    for ref in refs.values():
        assert torch.count_nonzero(ref["logp"]) > 0 and torch.count_nonzero(ref["values"]) > 0
        assert torch.equal(ref["logp"], ref["ref_logp"])  # the reference is the initial actor
        assert (ref["entropy"] > 0).sum() == (ref["logp"] != 0).sum()
    return refs


def test_two_process_layouts_match_single_process(references):
    wholes = {k: v["wholes"] for k, v in references.items()}
    layouts = [("tp2", ["parallel.tp=2"], []), ("pp2", ["parallel.pp=2"], []), ("cp2", ["parallel.cp=2"], []),
               ("dp2", [], []), ("pp2-untied", ["parallel.pp=2"], ["model.tie_word_embeddings=false"]),
               ("tp2-sp", ["parallel.tp=2", "parallel.sequence_parallel=true"], []),
               ("padded-tp2", [PADDED, "parallel.tp=2"], []), ("padded-pp2", [PADDED, "parallel.pp=2"], []),
               ("padded-cp2", [PADDED, "parallel.cp=2"], []),
               ("padded-tp2-sp", [PADDED, "parallel.tp=2", "parallel.sequence_parallel=true"], [])]
    results = run_gloo(layouts_worker, 2, layouts, wholes, timeout=600)
    for name, _, extra in layouts:
        _compare(name, [r[name] for r in results], references[tuple(extra)])


def test_four_process_layouts_match_single_process(references):
    wholes = {(): references[()]["wholes"]}
    layouts = [("tp2pp2", ["parallel.tp=2", "parallel.pp=2"], []),
               ("tp2cp2", ["parallel.tp=2", "parallel.cp=2"], []),
               ("padded-tp2cp2", [PADDED, "parallel.tp=2", "parallel.cp=2"], [])]
    results = run_gloo(layouts_worker, 4, layouts, wholes, timeout=600)
    for name, _, _ in layouts:
        _compare(name, [r[name] for r in results], references[()])
