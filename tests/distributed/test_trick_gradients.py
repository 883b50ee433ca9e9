"""The paper's tricks and the other optional terms, one update each, against a plain float64 computation
(docs/semantics.md sections 3 and 4): clip-higher, overlong filtering (with token-mean and
seq-mean-token-mean aggregation, actor and critic), the rloo and reinforce_plus_plus estimators, and the
rollout importance weight (token and sequence, from a separate old-log-prob pass and from the update's
own pass). Each runs through the trainer's code (`trainer.experience.advantages_and_returns`, then
`ModelUpdater.update`) in one process, at DP=2 and at TP=2; the reference writes every formula out from
the semantics, independently of `liteppo_mcore.algo`, `trainer` and `update`. Each key must also move the
update away from the same run without it, so a key that is validated but not applied fails here.
"""

import math

import pytest
import torch

from tests.distributed.spawn import run_gloo
from tests.distributed.test_train_invariance import BASE, SGD_TOL, STEP_TOL, VOCAB, N, _response_view, make_step_batch

T = 12                # response_length
TEMPERATURE = 0.7     # BASE's rollout.temperature
LR = 0.1              # BASE's train.lr (SGD)
OVERLONG_ROWS = (1, 4)  # responses whose finish reason is "length"
ONE_STEP = ["ppo_epochs=1", f"train.mini_batch_size={N}", "whiten_advantages=true", "advantage_clip=null",
            "gamma=1.0", "lambd=0.95"]
# name -> (overrides, whether the layouts receive old log-probs from a pass of their own, the case without the key)
CASES = {
    "base": (["adv_estimator=reinforce"], True, None),
    "clip_higher": (["adv_estimator=reinforce", "pg_clip_low=0.1", "pg_clip_high=0.4"], True, "base"),
    "gae": (["adv_estimator=gae"], True, None),
    "overlong": (["adv_estimator=gae", "overlong_filter=true"], True, "gae"),
    "seq_mean": (["adv_estimator=rloo", "token_level_loss=false", "loss_agg_mode=seq-mean-token-mean"], True, None),
    "overlong_seq_mean": (["adv_estimator=rloo", "token_level_loss=false", "loss_agg_mode=seq-mean-token-mean",
                           "overlong_filter=true"], True, "seq_mean"),
    "rloo": (["adv_estimator=rloo", "whiten_advantages=false"], True, "reinforce_unwhitened"),
    "reinforce_unwhitened": (["adv_estimator=reinforce", "whiten_advantages=false"], True, None),
    "reinforce_kl": (["adv_estimator=reinforce", "whiten_advantages=false", "add_token_level_kl=true",
                      "init_kl_coef=0.1", "gamma=0.95"], True, None),
    "reinforce_pp": (["adv_estimator=reinforce_plus_plus", "whiten_advantages=false", "add_token_level_kl=true",
                      "init_kl_coef=0.1", "gamma=0.95"], True, "reinforce_kl"),
    "is_token": (["adv_estimator=reinforce", "rollout_is=token", "rollout_is_threshold=1.2"], True, "base"),
    "is_sequence": (["adv_estimator=reinforce", "rollout_is=sequence", "rollout_is_threshold=1.5"], True, "base"),
    # one update and no reference: the update's own detached log-probs are old_logp
    "own_pass": (["adv_estimator=reinforce", "use_kl_loss=false"], False, None),
    "is_token_own_pass": (["adv_estimator=reinforce", "use_kl_loss=false", "rollout_is=token",
                           "rollout_is_threshold=1.2"], False, "own_pass"),
}
LAYOUTS = {1: [("one_process", ["train.micro_batch_size=2"])],
           2: [("dp2", ["train.micro_batch_size=2"]), ("tp2", ["parallel.tp=2", "train.micro_batch_size=3"])]}


def _overrides(case):
    return BASE + ONE_STEP + CASES[case][0]


def make_data():
    data = make_step_batch(seed=4)
    g = torch.Generator().manual_seed(11)
    mask = torch.arange(T)[None, :] < data["response_lens"][:, None]
    data["rollout_noise"] = torch.where(mask, torch.randn(N, T, generator=g) * 0.3, torch.zeros(()))
    data["scores"] = torch.randn(N, generator=g)  # the normalized rewards r~
    data["finish_reasons"] = ["length" if i in OVERLONG_ROWS else "stop" for i in range(N)]
    return data


# ---------------------------------------------------------------- the plain float64 reference
def _reverse_sum(x, lens, discount):
    out = torch.zeros_like(x)
    for i, n in enumerate(lens.tolist()):
        running = 0.0
        for t in reversed(range(n)):
            running = x[i, t] + discount * running
            out[i, t] = running
    return out


def _whiten(x, m):
    flat = x[m]
    mu, var = flat.mean(), flat.var(unbiased=True)
    return torch.where(m, (x - mu) / torch.sqrt(var + 1e-8), 0.0)


def _agg(x, m, cfg, lens):
    x = torch.where(m, x, 0.0)
    if cfg.effective_loss_agg_mode == "token-mean":
        return x.sum() / m.sum()
    assert cfg.effective_loss_agg_mode == "seq-mean-token-mean"
    num_seqs = (m.sum(1) > 0).sum()
    return (x.sum(1) / lens.clamp(min=1)).sum() / num_seqs


def plain_step(models, data, cfg, given_old):
    """The losses of the whole batch from the formulas; backward; SGD. Returns the inputs the layouts
    get, the whole weights after the step and the metrics the formulas predict."""
    tokens, pl, lens = data["tokens"], data["prompt_lens"], data["response_lens"]
    mask = torch.arange(T)[None, :] < lens[:, None]
    targets = torch.zeros(N, T, dtype=torch.long)
    for i in range(N):
        targets[i, :lens[i]] = tokens[i, pl[i]:pl[i] + lens[i]]
    device = next(models.actor.parameters()).device  # the model's device; the data is built on the host
    logits = _response_view(models.actor(tokens.to(device), None, attention_mask=None)[..., :VOCAB], pl, T)
    logprobs = torch.log_softmax(logits.double() / TEMPERATURE, dim=-1).cpu()
    logp = torch.where(mask, logprobs.gather(-1, targets[..., None]).squeeze(-1), 0.0)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    # what the layouts receive, in fp32
    old = (logp.detach() + data["logp_noise"]).float().double() if given_old else logp.detach()
    ref = (logp.detach() + data["ref_noise"]).float().double()
    rollout = (logp.detach() + data["rollout_noise"]).float().double()

    # token rewards (semantics section 2): r~ on the last token, minus beta * (old - ref) with the KL in the reward
    rewards = torch.zeros(N, T, dtype=torch.float64)
    rewards[torch.arange(N), lens - 1] = data["scores"].double()
    if cfg.add_token_level_kl:
        rewards = rewards - cfg.init_kl_coef * torch.where(mask, old - ref, 0.0)
    values = data["old_values"].double()
    # advantages (section 3)
    trained = mask.clone()
    if cfg.overlong_filter:
        trained[list(OVERLONG_ROWS)] = False
    if cfg.adv_estimator == "gae":
        v = torch.where(mask, values, 0.0)
        next_v = torch.nn.functional.pad(v[:, 1:], (0, 1))
        delta = torch.where(mask, rewards + cfg.gamma * next_v - v, 0.0)
        adv = _reverse_sum(delta, lens, cfg.gamma * cfg.lambd)
        returns = torch.where(mask, adv + v, 0.0)
    elif cfg.adv_estimator == "rloo":
        totals = (rewards * mask).sum(1)
        group = cfg.num_return_sequences_in_group
        baseline = torch.stack([torch.cat([totals[i - i % group:i], totals[i + 1:i - i % group + group]]).mean()
                                for i in range(N)])
        adv = returns = torch.where(mask, (totals - baseline)[:, None], 0.0)
    else:
        adv = returns = _reverse_sum(rewards, lens, cfg.gamma)
        if cfg.adv_estimator == "reinforce_plus_plus":
            adv = _whiten(returns, trained)
    adv, returns = torch.where(trained, adv, 0.0), torch.where(trained, returns, 0.0)
    if cfg.whiten_advantages:
        adv = _whiten(adv, trained)

    # the actor loss (section 4)
    ratio = torch.exp(logp - old)
    low = cfg.pg_clip if cfg.pg_clip_low is None else cfg.pg_clip_low
    high = cfg.pg_clip if cfg.pg_clip_high is None else cfg.pg_clip_high
    unclipped, clipped = -ratio * adv, -ratio.clamp(1 - low, 1 + high) * adv
    pg = torch.maximum(unclipped, clipped)
    pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip_ratio * adv), pg)
    metrics = {"actor/clipfrac_low": float((trained & (clipped > unclipped) & (ratio < 1 - low)).sum() / trained.sum()),
               "actor/clipfrac_high": float((trained & (clipped > unclipped) & (ratio > 1 + high)).sum()
                                            / trained.sum())}
    if cfg.rollout_is is not None:
        log_w = torch.where(mask, old - rollout, 0.0)
        if cfg.rollout_is == "sequence":
            log_w = torch.where(mask, log_w.sum(1, keepdim=True), 0.0)
        raw = torch.exp(log_w)
        weight = raw.clamp(max=cfg.rollout_is_threshold)
        pg = pg * weight
        metrics.update({"rollout/is_weight_mean": float(weight[trained].mean()),
                        "rollout/is_weight_max": float(weight[trained].max()),
                        "rollout/is_truncated_fraction": float((raw[trained] >= cfg.rollout_is_threshold).double()
                                                               .mean())})
    loss = _agg(pg, trained, cfg, lens) - cfg.entropy_coef * _agg(entropy, trained, cfg, lens)
    if cfg.use_kl_loss:
        d = logp - ref
        loss = loss + cfg.kl_loss_coef * _agg(torch.exp(-d) + d - 1, trained, cfg, lens)
    if cfg.has_critic:
        v_new = _response_view(models.critic(tokens.to(device), None, attention_mask=None), pl, T).squeeze(-1)
        v_new = v_new.double().cpu()
        v_clip = values + (v_new - values).clamp(-cfg.value_clip, cfg.value_clip)
        error = torch.maximum((v_new - returns) ** 2, (v_clip - returns) ** 2)
        loss = loss + 0.5 * _agg(error, trained, cfg, lens)
    loss.backward()
    inputs = {"old_logp": old.float() if given_old else None, "ref_logp": ref.float(), "rollout_logp": rollout.float()}
    return inputs, metrics


def reference_worker(rank, ws, data):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    out = {}
    for case, (_, given_old, _) in CASES.items():
        cfg = load_config(overrides=_overrides(case), world_size=1)
        groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
        models = build_models(cfg, groups)
        kinds = ["actor"] + (["critic"] if cfg.has_critic else [])
        if "init" not in out:  # the first case has no critic: take the critic's weights from a gae build
            gae = build_models(load_config(overrides=_overrides("gae"), world_size=1), groups)
            head = gae.critic.output_layer.weight
            head.data.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
            out["init"] = {"actor": whole_state_dict(models.actor, groups, VOCAB),
                           "critic": whole_state_dict(gae.critic, groups, VOCAB)}
        for kind in kinds:
            load_whole_state_dict(getattr(models, kind), out["init"][kind], groups, VOCAB)
        inputs, metrics = plain_step(models, data, cfg, given_old)
        result = {"inputs": inputs, "metrics": metrics}
        for kind in kinds:
            model = getattr(models, kind)
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= LR * p.grad
            result[kind] = whole_state_dict(model, groups, VOCAB)
        out[case] = result
        destroy_model_parallel()
    return out


# ---------------------------------------------------------------- the layouts, through trainer/ and update/
def run_case(ws, case, layout_overrides, init, data, inputs):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.parallel.reducer import Reducer
    from liteppo_mcore.trainer import experience
    from liteppo_mcore.update import ModelUpdater, TrainBatch, gather_over_dp

    cfg = load_config(overrides=_overrides(case) + layout_overrides, world_size=ws)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    models = build_models(cfg, groups)
    kinds = ["actor"] + (["critic"] if cfg.has_critic else [])
    for kind in kinds:
        load_whole_state_dict(getattr(models, kind), init[kind], groups, VOCAB)
    per_rank = N // groups.dp_size
    rows = torch.arange(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)
    batch = TrainBatch(tokens=data["tokens"][rows], prompt_lens=data["prompt_lens"][rows],
                       response_lens=data["response_lens"][rows], ref_logp=inputs["ref_logp"][rows])
    rollout = experience.Rollout(batch=batch, rollout_logp=inputs["rollout_logp"][rows],
                                 finish_reasons=[data["finish_reasons"][i] for i in rows.tolist()],
                                 response_texts=[""] * per_rank, answers=[""] * per_rank)
    if inputs["old_logp"] is not None:
        batch.old_logp = inputs["old_logp"][rows]
    assert cfg.needs_old_logp_pass() == (inputs["old_logp"] is not None)  # as the trainer decides
    if batch.old_logp is None or cfg.rollout_is is not None:  # as Trainer.log_probs_and_values
        batch.rollout_logp = rollout.rollout_logp
    reducer = Reducer(groups.dp_group, groups.dp_cp_group)
    metrics = experience.advantages_and_returns(rollout, data["scores"][rows], cfg, reducer, kl_coef=cfg.init_kl_coef,
                                                values=data["old_values"][rows] if cfg.has_critic else None)
    metrics.update(experience.rollout_metrics(rollout, reducer))
    step_batch = gather_over_dp(rollout.batch, groups)
    out = {}
    for kind in kinds:
        model = getattr(models, kind)
        metrics.update(ModelUpdater(model, kind, cfg, groups, vocab_size=VOCAB).update(step_batch, step=0))
        out[kind] = whole_state_dict(model, groups, VOCAB)
    out["metrics"] = metrics
    destroy_model_parallel()
    return out


def layouts_worker(rank, ws, init, data, refs):
    return {(layout, case): run_case(ws, case, overrides, init, data, refs[case]["inputs"])
            for layout, overrides in LAYOUTS[ws] for case in CASES}


def _relative(a, b):
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b]).norm()
    return float(diff / torch.cat([v.flatten() for v in b.values()]).norm())


def _check(results, refs):
    init = refs["init"]
    for (layout, case), got in results.items():
        want = refs[case]
        for kind in ("actor", "critic"):
            if kind not in want:
                assert kind not in got, (layout, case)
                continue
            assert _relative(got[kind], want[kind]) <= SGD_TOL, (layout, case, kind)
            for name, w in want[kind].items():
                moved = (w - init[kind][name]).norm().item()
                err = (got[kind][name] - w).norm().item() / max(moved, 1e-30)
                assert moved == 0 or err <= STEP_TOL, (layout, case, kind, name, err)
        for key, value in want["metrics"].items():
            assert math.isclose(got["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-7), (layout, case, key)
        assert got["metrics"]["rollout/overlong_fraction"] == len(OVERLONG_ROWS) / N


@pytest.fixture(scope="module")
def reference():
    data = make_data()
    (refs,) = run_gloo(reference_worker, 1, data, timeout=300)
    return data, refs


def test_each_key_changes_the_reference_update(reference):
    """The formulas of each key move the weights away from the same step without it (the reference's
    own check that the cases exercise something), and their terms are active in this batch."""
    _, refs = reference
    for case, (_, _, without) in CASES.items():
        if without is not None:
            for kind in ("actor", "critic"):
                if kind in refs[case]:
                    assert _relative(refs[case][kind], refs[without][kind]) > 1e3 * SGD_TOL, (case, kind)
    m = refs["clip_higher"]["metrics"]
    assert m["actor/clipfrac_low"] > refs["base"]["metrics"]["actor/clipfrac_low"] and m["actor/clipfrac_high"] > 0
    for case in ("is_token", "is_sequence", "is_token_own_pass"):
        m = refs[case]["metrics"]
        threshold = float(next(o for o in CASES[case][0] if o.startswith("rollout_is_threshold=")).split("=")[1])
        assert 0 < m["rollout/is_truncated_fraction"] < 1 and m["rollout/is_weight_max"] == threshold, case


def test_one_process_matches_plain_float64(reference):
    data, refs = reference
    (results,) = run_gloo(layouts_worker, 1, refs["init"], data, refs, timeout=400)
    _check(results, refs)


def test_dp2_and_tp2_match_plain_float64(reference):
    data, refs = reference
    per_rank = run_gloo(layouts_worker, 2, refs["init"], data, refs, timeout=600)
    for results in per_rank:
        _check(results, refs)


def all_overlong_worker(rank, ws, init, data, inputs):
    everything = dict(data, finish_reasons=["length"] * N)
    adamw = ["train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.1", "train.micro_batch_size=2"]
    return run_case(ws, "overlong", adamw, init, everything, inputs)


def test_a_mini_batch_left_wholly_out_makes_no_optimizer_step(reference):
    """With every response overlong nothing is trained: AdamW's weight decay and momentum would still
    move the weights on a zero gradient, so the mini-batch makes no step (and is not a skipped one)."""
    data, refs = reference
    (got,) = run_gloo(all_overlong_worker, 1, refs["init"], data, refs["overlong"]["inputs"], timeout=300)
    for kind in ("actor", "critic"):
        assert all(torch.equal(got[kind][k], refs["init"][kind][k]) for k in refs["init"][kind]), kind
        assert got["metrics"][f"{kind}/skipped_updates"] == 0 and math.isnan(got["metrics"][f"{kind}/grad_norm"])
    assert got["metrics"]["rollout/overlong_fraction"] == 1.0
