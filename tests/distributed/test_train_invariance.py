"""Gradient invariance of the PPO update (docs/semantics.md section 4): from the same weights and
batch, one optimizer step through megatron's schedules gives the same parameters as a plain
single-process PyTorch computation of the loss formula, for every aggregation mode and layout.

The plain reference uses the same megatron GPT forward (one process, TP=1, no schedule, no DDP) and
writes the losses out from the formulas, independently of `liteppo_mcore.algo` and `liteppo_mcore.update`.
"""

import math

import pytest
import torch

from tests.distributed.spawn import run_gloo

VOCAB = 100
N = 8              # responses of the step
TEMPERATURE = 0.7
LR = 0.1
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=128",
        "rollout_batch_size=4", "num_return_sequences_in_group=2", f"train.mini_batch_size={N}",
        "adv_estimator=gae", "use_kl_loss=true", "kl_loss_type=k3", "kl_loss_coef=0.3", "entropy_coef=0.05",
        "dual_clip_loss=true", "dual_clip_ratio=3.0", "pg_clip=0.2", "value_clip=0.05", "train.clip_grad=0",
        "train.optimizer=sgd", f"train.lr={LR}", f"critic.lr={LR}", f"rollout.temperature={TEMPERATURE}",
        "response_length=12", "prompt_length=12", "model.init_std=0.1"]
MODES = [("token_level", ["token_level_loss=true", "loss_agg_mode=seq-mean-token-sum"])] + [
    (m, ["token_level_loss=false", f"loss_agg_mode={m}"])
    for m in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")]
PADDED = "train.pack_sequences=false"  # the layouts run packed (the default) and, where named so, padded
LAYOUTS_1 = [("one_micro_batch", [f"train.micro_batch_size={N}"]), ("micro_1", ["train.micro_batch_size=1"]),
             ("token_bound", [f"train.micro_batch_size={N}", "train.max_tokens_per_micro_batch=40"]),
             ("padded_micro_3", [PADDED, "train.micro_batch_size=3"]),
             ("padded_token_bound", [PADDED, f"train.micro_batch_size={N}", "train.max_tokens_per_micro_batch=40"])]
LAYOUTS_2 = [("dp2", ["train.micro_batch_size=2"]), ("tp2", ["parallel.tp=2", "train.micro_batch_size=3"]),
             ("pp2", ["parallel.pp=2", "train.micro_batch_size=2"]),
             ("cp2", ["parallel.cp=2", "train.micro_batch_size=4"]),
             ("pp2_token_bound", ["parallel.pp=2", "train.micro_batch_size=8", "train.max_tokens_per_micro_batch=40"]),
             ("tp2_sp", ["parallel.tp=2", "parallel.sequence_parallel=true", "train.micro_batch_size=3"]),
             ("padded_tp2", [PADDED, "parallel.tp=2", "train.micro_batch_size=3"]),
             ("padded_pp2", [PADDED, "parallel.pp=2", "train.micro_batch_size=2"]),
             ("padded_cp2", [PADDED, "parallel.cp=2", "train.micro_batch_size=4"])]
LAYOUTS_4 = [("tp2pp2", ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=4"]),
             ("cp2dp2", ["parallel.cp=2", "train.micro_batch_size=2"]),
             ("padded_tp2pp2", [PADDED, "parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=4"])]
ADAMW = ["train.optimizer=adamw", "train.lr=0.001", "critic.lr=0.001", "train.weight_decay=0", "critic.weight_decay=0"]


def make_step_batch(seed=0):
    """Random sequences with made-up old/ref log-probs (perturbed around the model's own, so that
    clipping, dual clipping and KL are all active), advantages, returns and old values."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(2, 8, (N,), generator=g)
    response_lens = torch.randint(1, 12, (N,), generator=g)
    response_lens[0], response_lens[1] = 1, 12
    s = int((prompt_lens + response_lens).max())
    tokens = torch.randint(0, VOCAB, (N, s), generator=g)
    t = 12
    mask = torch.arange(t)[None, :] < response_lens[:, None]

    def per_token(scale, shift=0.0):
        return torch.where(mask, torch.randn(N, t, generator=g) * scale + shift, torch.zeros(()))

    return {"tokens": tokens, "prompt_lens": prompt_lens, "response_lens": response_lens,
            "advantages": per_token(1.5), "logp_noise": per_token(0.3), "ref_noise": per_token(0.5),
            "returns": per_token(1.0), "old_values": per_token(0.1)}


# ---------------------------------------------------------------- the plain single-process reference
def _plain_agg(x, mask, mode, lens):
    m = mask.to(x.dtype)
    num_seqs = (lens > 0).sum()
    if mode == "token-mean":
        return (x * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return (x * m).sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        return (x * m).sum() / (num_seqs * 12)
    return ((x * m).sum(-1) / lens.clamp(min=1)).sum() / num_seqs


def _response_view(full, prompt_lens, t):
    """[B, S, ...] at the positions predicting response tokens -> [B, t, ...] (index clamped)."""
    idx = (prompt_lens - 1)[:, None] + torch.arange(t)[None, :]
    idx = idx.clamp(max=full.shape[1] - 1).to(full.device)
    if full.dim() == 3:
        return full.gather(1, idx[..., None].expand(-1, -1, full.shape[-1]))
    return full.gather(1, idx)


def plain_losses(actor, critic, data, cfg):
    """Actor and critic losses of the whole batch from the semantics formulas; also returns the
    current log-probs so the caller can build old/ref log-probs around them."""
    tokens, pl, rl = data["tokens"], data["prompt_lens"], data["response_lens"]
    t = data["advantages"].shape[1]
    mask = torch.arange(t)[None, :] < rl[:, None]
    targets = torch.zeros(tokens.shape[0], t, dtype=torch.long)
    for i in range(tokens.shape[0]):
        targets[i, :rl[i]] = tokens[i, pl[i]:pl[i] + rl[i]]
    # float64 from the logits on: the reference should be the more exact side of the comparison
    # the plain computation runs where the model is (the data is built on the host, as in the trainer)
    device = next(actor.parameters()).device
    logits = _response_view(actor(tokens.to(device), None, attention_mask=None)[..., :VOCAB], pl, t)
    logprobs = torch.log_softmax(logits.double() / TEMPERATURE, dim=-1).cpu()
    logp = logprobs.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    old = (logp.detach() + data["logp_noise"]).float().double()  # what the layouts receive, in fp32
    ref = (logp.detach() + data["ref_noise"]).float().double()
    adv = data["advantages"].double()
    mode = cfg.effective_loss_agg_mode
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-ratio * adv, -ratio.clamp(0.8, 1.2) * adv)
    pg = torch.where(adv < 0, torch.minimum(pg, -3.0 * adv), pg)
    d = logp - ref
    k3 = torch.exp(-d) + d - 1
    actor_loss = (_plain_agg(pg, mask, mode, rl) + 0.3 * _plain_agg(k3, mask, mode, rl)
                  - 0.05 * _plain_agg(entropy, mask, mode, rl))
    values = _response_view(critic(tokens.to(device), None, attention_mask=None), pl, t).squeeze(-1).double().cpu()
    ret, vold = data["returns"].double(), data["old_values"].double()
    vclip = vold + (values - vold).clamp(-0.05, 0.05)
    e = torch.maximum((values - ret) ** 2, (vclip - ret) ** 2)
    critic_loss = 0.5 * _plain_agg(e, mask, mode, rl)
    return actor_loss, critic_loss, old.float(), ref.float()


def reference_worker(rank, ws, data):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    out = {}
    for optimizer, extra in (("sgd", []), ("adamw", ADAMW)):
        for name, mode_overrides in MODES:
            cfg = load_config(overrides=BASE + mode_overrides + extra, world_size=1)
            groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
            models = build_models(cfg, groups)
            if "init" not in out:
                head = models.critic.output_layer.weight
                head.data.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
                out["init"] = {"actor": whole_state_dict(models.actor, groups, VOCAB),
                               "critic": whole_state_dict(models.critic, groups, VOCAB)}
            load_whole_state_dict(models.actor, out["init"]["actor"], groups, VOCAB)
            load_whole_state_dict(models.critic, out["init"]["critic"], groups, VOCAB)
            actor_loss, critic_loss, old, ref = plain_losses(models.actor, models.critic, data, cfg)
            (actor_loss + critic_loss).backward()
            result = {"old_logp": old, "ref_logp": ref}
            for kind, model in (("actor", models.actor), ("critic", models.critic)):
                params = [p for p in model.parameters() if p.requires_grad]
                result[f"{kind}_grad"] = _whole_grads(model, groups)
                result[f"{kind}_grad_norm"] = torch.cat([g.flatten() for g in result[f"{kind}_grad"].values()]).norm()
                if optimizer == "sgd":
                    with torch.no_grad():
                        for p in params:
                            p -= LR * p.grad
                else:
                    torch.optim.AdamW(params, lr=0.001, weight_decay=0.0).step()
                result[kind] = whole_state_dict(model, groups, VOCAB)
            out[(optimizer, name)] = result
            destroy_model_parallel()
    return out


def _whole_grads(model, groups):
    from liteppo_mcore.models.state import whole_state_dict

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    grads = whole_state_dict(model, groups, VOCAB)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return grads


# ---------------------------------------------------------------- the layouts, through update/
def _train_batch(data, ref, rows=None):
    from liteppo_mcore.update import TrainBatch

    rows = torch.arange(N) if rows is None else rows
    return TrainBatch(tokens=data["tokens"][rows], prompt_lens=data["prompt_lens"][rows],
                      response_lens=data["response_lens"][rows], advantages=data["advantages"][rows],
                      old_logp=ref["old_logp"][rows], ref_logp=ref["ref_logp"][rows],
                      returns=data["returns"][rows], old_values=data["old_values"][rows])


def run_update(ws, overrides, init, data, ref):
    """One step of actor and critic updates in this process's layout; whole weights afterwards."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.update import ModelUpdater, gather_over_dp

    cfg = load_config(overrides=BASE + overrides, world_size=ws)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    models = build_models(cfg, groups)
    load_whole_state_dict(models.actor, init["actor"], groups, VOCAB)
    load_whole_state_dict(models.critic, init["critic"], groups, VOCAB)
    per_rank = N // groups.dp_size
    local = _train_batch(data, ref, torch.arange(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank))
    batch = gather_over_dp(local, groups)
    out = {"metrics": {}}
    for kind in ("actor", "critic"):
        model = getattr(models, kind)
        out["metrics"].update(ModelUpdater(model, kind, cfg, groups, vocab_size=VOCAB).update(batch, step=0))
        out[kind] = whole_state_dict(model, groups, VOCAB)
    destroy_model_parallel()
    return out


def layouts_worker(rank, ws, layouts, refs, data):
    results = {}
    for layout, overrides in layouts:
        for optimizer, extra in (("sgd", []), ("adamw", ADAMW)):
            for name, mode_overrides in MODES:
                if optimizer == "adamw" and name != "token_level":
                    continue
                ref = refs[(optimizer, name)]
                results[(layout, optimizer, name)] = run_update(ws, overrides + mode_overrides + extra, refs["init"],
                                                                data, ref)
    return results


SGD_TOL = 1e-6    # parameters after the step: |difference| / |parameters|, over the whole model
STEP_TOL = 2e-5   # the update itself, per tensor: |difference| / |reference update| (fp32 backward noise)
ADAMW_TOL = 1e-6  # absolute, on parameters whose gradient is above 1e-3 of the tensor's largest (lr 1e-3)


def _compare(key, got, ref, init):
    _, optimizer, _ = key
    for kind in ("actor", "critic"):
        assert got[kind].keys() == ref[kind].keys(), key
        if optimizer == "sgd":
            diff = torch.cat([(got[kind][n] - w).flatten() for n, w in ref[kind].items()]).norm()
            scale = torch.cat([w.flatten() for w in ref[kind].values()]).norm()
            assert diff / scale <= SGD_TOL, f"{key} {kind}: parameters differ by {diff / scale:.2e} (relative)"
        for name, want in ref[kind].items():
            have = got[kind][name]
            if optimizer == "sgd":
                moved = (want - init[kind][name]).norm().item()
                step_err = (have - want).norm().item() / max(moved, 1e-30)
                assert moved == 0 or step_err <= STEP_TOL, f"{key} {kind}.{name}: update differs by {step_err:.2e}"
            else:
                grad = ref[f"{kind}_grad"][name].abs()
                big = grad > 1e-3 * grad.max()
                if big.any():
                    diff = (have - want)[big].abs().max().item()
                    assert diff <= ADAMW_TOL, f"{key} {kind}.{name}: AdamW step differs by {diff:.2e}"


@pytest.fixture(scope="module")
def reference():
    data = make_step_batch()
    (refs,) = run_gloo(reference_worker, 1, data, timeout=300)
    for (optimizer, name), ref in ((k, v) for k, v in refs.items() if k != "init"):
        for kind in ("actor", "critic"):
            moved = max((ref[kind][n] - refs["init"][kind][n]).abs().max().item() for n in ref[kind])
            assert moved > 1e-4, f"the reference {kind} did not move ({optimizer}, {name})"
    return data, refs


def _check(results, refs, layouts):
    for (layout, optimizer, name), got in results.items():
        _compare((layout, optimizer, name), got, refs[(optimizer, name)], refs["init"])
        m = got["metrics"]
        assert m["actor/clipfrac"] > 0 and m["actor/ratio_max"] > 1.2 and m["actor/skipped_updates"] == 0
        assert math.isfinite(m["critic/value_loss"]) and m["critic/vf_clipfrac"] > 0
        for kind in ("actor", "critic"):  # the global gradient norm, each parameter counted once
            want = refs[(optimizer, name)][f"{kind}_grad_norm"].item()
            assert math.isclose(m[f"{kind}/grad_norm"], want, rel_tol=1e-5), (layout, kind, m[f"{kind}/grad_norm"],
                                                                              want)
    assert {k[0] for k in results} == {name for name, _ in layouts}


def test_one_process_layouts_match_plain_pytorch(reference):
    data, refs = reference
    results = run_gloo(layouts_worker, 1, LAYOUTS_1, refs, data, timeout=300)[0]
    _check(results, refs, LAYOUTS_1)


def test_two_process_layouts_match_plain_pytorch(reference):
    data, refs = reference
    per_rank = run_gloo(layouts_worker, 2, LAYOUTS_2, refs, data, timeout=600)
    for results in per_rank:
        _check(results, refs, LAYOUTS_2)
    # every rank reports the same metrics (reduced over the right groups)
    for key in per_rank[0]:
        assert per_rank[0][key]["metrics"] == pytest.approx(per_rank[1][key]["metrics"], rel=1e-12), key


def test_tp2_pp2_matches_plain_pytorch(reference):
    data, refs = reference
    per_rank = run_gloo(layouts_worker, 4, LAYOUTS_4, refs, data, timeout=600)
    for results in per_rank:
        _check(results, refs, LAYOUTS_4)
