"""A whole update step as the trainer runs it: old log-probs from the training actor, ppo_epochs
passes over mini-batches drawn from (seed, step, epoch), then the same weights whatever the DP size;
the ratio is exactly 1 with a single update; a non-finite loss skips the update; bf16 and the
distributed optimizer run."""

import math

import torch

from tests.distributed.spawn import run_gloo
from tests.distributed.test_train_invariance import BASE, VOCAB, N, make_step_batch

STEP = 3
ADAMW = ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.01"]
TWO_EPOCHS = ["ppo_epochs=2", "train.mini_batch_size=4", "train.micro_batch_size=2"]
# Four chained fp32 updates from log-probs each layout computes itself: fp32 noise grows to ~1e-6, while a
# mini-batch composition that depended on DP would move the weights by ~1e-2.
MULTI_STEP_TOL = 1e-5
CLIP_HIGHER = ["pg_clip_low=0.001", "pg_clip_high=0.5"]  # clipped below at once, hardly ever above
ROLLOUT_IS = ["rollout_is=sequence", "rollout_is_threshold=1.5"]
ONE_UPDATE = ["ppo_epochs=1", f"train.mini_batch_size={N}", "train.micro_batch_size=2"]


def run_step(ws, overrides, data, init, *, with_old_logp=True, poison=False, engine_logp=False):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.update import ModelUpdater, TrainBatch, gather_over_dp

    cfg = load_config(overrides=BASE + overrides, world_size=ws)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    models = build_models(cfg, groups)
    load_whole_state_dict(models.actor, init, groups, VOCAB)
    load_whole_state_dict(models.reference, init, groups, VOCAB)
    per_rank = N // groups.dp_size
    rows = torch.arange(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)
    local = TrainBatch(tokens=data["tokens"][rows], prompt_lens=data["prompt_lens"][rows],
                       response_lens=data["response_lens"][rows], advantages=data["advantages"][rows].clone())
    if poison:
        local.advantages[0, 0] = float("nan")  # a valid position: the loss becomes NaN
    kw = dict(temperature=cfg.rollout.temperature, vocab_size=VOCAB, micro_batch_size=2, compute_entropy=False)
    local.ref_logp = forward_per_token(models.reference, local.sequences(), groups, **kw)["logp"]
    if with_old_logp:
        local.old_logp = forward_per_token(models.actor, local.sequences(), groups, **kw)["logp"]
    if engine_logp:  # the engine's log-probs: the old policy's, off by up to +-0.3 per token
        local.rollout_logp = local.old_logp + data["logp_noise"][rows, :local.old_logp.shape[1]]
    updater = ModelUpdater(models.actor, "actor", cfg, groups, vocab_size=VOCAB)
    metrics = updater.update(gather_over_dp(local, groups), step=STEP)
    out = {"metrics": metrics, "actor": whole_state_dict(models.actor, groups, VOCAB),
           "dtypes": {p.dtype for p in models.actor.parameters()}, "num_updates": updater.num_updates}
    main = [p for g in updater.optimizer.param_groups for p in g["params"]]
    out["main_dtypes"] = {p.dtype for p in main}
    destroy_model_parallel()
    return out


def init_worker(rank, ws):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    cfg = load_config(overrides=BASE, world_size=1)
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    init = whole_state_dict(build_models(cfg, groups).actor, groups, VOCAB)
    destroy_model_parallel()
    return init


def one_process_worker(rank, ws, data, init):
    return {
        "two_epochs": run_step(ws, TWO_EPOCHS, data, init),
        "one_update": run_step(ws, ONE_UPDATE, data, init, with_old_logp=False),
        "poisoned": run_step(ws, ONE_UPDATE, data, init, with_old_logp=False, poison=True),
        "poisoned_two_epochs": run_step(ws, TWO_EPOCHS, data, init, poison=True),
        "bf16": run_step(ws, ONE_UPDATE + ["model.dtype=bf16", "train.optimizer=adamw", "train.lr=0.01"],
                         data, init, with_old_logp=False),
        "one_update_clipped": run_step(ws, ONE_UPDATE + ["train.clip_grad=0.05"], data, init, with_old_logp=False),
        "token_bound": run_step(ws, TWO_EPOCHS + ["train.max_tokens_per_micro_batch=30"], data, init),
        "clip_higher": run_step(ws, TWO_EPOCHS + CLIP_HIGHER, data, init),
        "rollout_is": run_step(ws, TWO_EPOCHS + ROLLOUT_IS, data, init, engine_logp=True),
    }


def two_process_worker(rank, ws, data, init):
    return {
        "two_epochs": run_step(ws, TWO_EPOCHS, data, init),
        "adamw": run_step(ws, TWO_EPOCHS + ADAMW, data, init),
        "adamw_distopt": run_step(ws, TWO_EPOCHS + ADAMW + ["train.use_distributed_optimizer=true"], data, init),
        "two_epochs_pp2": run_step(ws, TWO_EPOCHS + ["parallel.pp=2"], data, init),
        "clip_higher": run_step(ws, TWO_EPOCHS + CLIP_HIGHER, data, init),
        "rollout_is": run_step(ws, TWO_EPOCHS + ROLLOUT_IS, data, init, engine_logp=True),
    }


def _relative_difference(a, b):
    diff = torch.cat([(a[k].float() - b[k].float()).flatten() for k in b]).norm()
    return (diff / torch.cat([v.float().flatten() for v in b.values()]).norm()).item()


def _moved(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def test_update_step_is_independent_of_dp_and_guards_non_finite_losses():
    data = make_step_batch(seed=1)
    (init,) = run_gloo(init_worker, 1, timeout=120)
    (one,) = run_gloo(one_process_worker, 1, data, init, timeout=400)
    two = run_gloo(two_process_worker, 2, data, init, timeout=400)

    # ppo_epochs=2 with two mini-batches: four updates, and the later passes see ratio != 1
    ref = one["two_epochs"]
    assert ref["num_updates"] == 4 and _moved(ref["actor"], init) > 1e-3
    assert ref["metrics"]["actor/ratio_max"] > 1.0 + 1e-4 and ref["metrics"]["actor/approx_kl_k3"] > 0
    assert ref["metrics"]["actor/kl_loss"] > 0  # the actor moved away from the reference
    # mini-batch composition does not depend on DP: the same weights at DP=2, with or without ZeRO-1, and PP=2
    for name in ("two_epochs", "two_epochs_pp2"):
        for rank_result in two:
            assert _relative_difference(rank_result[name]["actor"], ref["actor"]) <= MULTI_STEP_TOL, name
            for key, value in ref["metrics"].items():
                assert math.isclose(rank_result[name]["metrics"][key], value, rel_tol=1e-5, abs_tol=1e-9), (name, key)
    # ZeRO-1 (distributed optimizer) gives the same AdamW steps as the replicated optimizer
    for rank_result in two:
        assert (_relative_difference(rank_result["adamw_distopt"]["actor"], rank_result["adamw"]["actor"])
                <= MULTI_STEP_TOL)
        assert _moved(rank_result["adamw"]["actor"], init) > 1e-3
    # clip-higher: the asymmetric range is applied (other weights, low/high clip fractions as set), the
    # same at DP=2
    ch = one["clip_higher"]
    assert _relative_difference(ch["actor"], ref["actor"]) > 10 * MULTI_STEP_TOL
    assert ch["metrics"]["actor/clipfrac_low"] > ref["metrics"]["actor/clipfrac_low"]
    assert ch["metrics"]["actor/clipfrac_high"] <= ref["metrics"]["actor/clipfrac_high"]
    assert math.isclose(ch["metrics"]["actor/clipfrac_low"] + ch["metrics"]["actor/clipfrac_high"],
                        ch["metrics"]["actor/clipfrac"], rel_tol=1e-9, abs_tol=1e-12)
    for rank_result in two:
        assert _relative_difference(rank_result["clip_higher"]["actor"], ch["actor"]) <= MULTI_STEP_TOL
    # the rollout importance weight over two epochs of two mini-batches each: weighted (other weights, some
    # truncated), the same weights each epoch (old_logp is fixed), and the same at DP=2
    weighted = one["rollout_is"]
    assert _relative_difference(weighted["actor"], ref["actor"]) > 10 * MULTI_STEP_TOL
    assert 0 < weighted["metrics"]["rollout/is_truncated_fraction"] < 1
    assert weighted["metrics"]["rollout/is_weight_max"] == 1.5
    for rank_result in two:
        assert _relative_difference(rank_result["rollout_is"]["actor"], weighted["actor"]) <= MULTI_STEP_TOL
        for key in ("rollout/is_weight_mean", "rollout/is_truncated_fraction"):
            assert math.isclose(rank_result["rollout_is"]["metrics"][key], weighted["metrics"][key], rel_tol=1e-6)
    # token-bounded micro-batches change nothing but the memory
    assert _relative_difference(one["token_bound"]["actor"], ref["actor"]) <= MULTI_STEP_TOL

    # exactly one optimizer update: the update's own log-probs are old_logp, the ratio is exactly 1
    single = one["one_update"]["metrics"]
    assert single["actor/ratio_max"] == 1.0 and single["actor/clipfrac"] == 0.0 and single["actor/approx_kl_k3"] == 0.0
    assert single["actor/approx_kl_k1"] == 0.0
    assert one["one_update"]["num_updates"] == 1 and _moved(one["one_update"]["actor"], init) > 1e-3

    # gradient clipping scales the update by clip / |g|, with |g| the global norm before clipping
    norm = one["one_update"]["metrics"]["actor/grad_norm"]
    clipped = one["one_update_clipped"]
    assert norm > 0.2, norm  # so that clipping at 0.05 scales the update by 4x or more
    assert math.isclose(clipped["metrics"]["actor/grad_norm"], norm, rel_tol=1e-6)
    for k in init:
        want = (one["one_update"]["actor"][k] - init[k]) * (0.05 / norm)
        err = ((clipped["actor"][k] - init[k]) - want).abs().max()
        rounding = 2 * torch.finfo(torch.float32).eps * init[k].abs().max()  # of the stored parameters
        assert err <= 1e-3 * want.abs().max() + rounding, (k, err)

    # a non-finite loss skips the update and leaves the weights exactly as they were
    poisoned = one["poisoned"]
    assert poisoned["metrics"]["actor/skipped_updates"] == 1 and poisoned["num_updates"] == 0
    assert all(torch.equal(poisoned["actor"][k], init[k]) for k in init)
    assert math.isnan(poisoned["metrics"]["actor/pg_loss"])
    # ... in every mini-batch holding the poisoned response, not in the others
    skipped = one["poisoned_two_epochs"]["metrics"]["actor/skipped_updates"]
    assert skipped == 2 and one["poisoned_two_epochs"]["num_updates"] == 2

    # bf16 parameters with fp32 master weights in the optimizer
    bf16 = one["bf16"]
    assert bf16["dtypes"] == {torch.bfloat16} and bf16["main_dtypes"] == {torch.float32}
    assert bf16["num_updates"] == 1 and _moved(bf16["actor"], init) > 1e-4
