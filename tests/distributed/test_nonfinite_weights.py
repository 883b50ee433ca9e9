"""Weights that an applied update leaves non-finite stop the run on every rank with TrainingHalted
(exit code 3), naming the model, the step, the update and the first such parameter; the check changes
nothing on the normal path (the same metrics and weights bit for bit as without it)."""

import math

import torch

from tests.distributed.spawn import run_gloo
from tests.distributed.test_train_invariance import BASE, VOCAB, N, make_step_batch

STEP = 3  # the trainer's 0-based counter: the step is logged (and named) as 4
TWO_UPDATES = ["ppo_epochs=1", "train.mini_batch_size=4", "train.micro_batch_size=2"]
TP2 = ["parallel.tp=2"]
POISONED = "decoder.layers.1.mlp.linear_fc1.weight"  # split over TP: rank 1 holds the second half
HUGE_LR = 3e38  # just below float32's largest number (torch refuses more): gradients above ~1.1 overflow
LARGE = 1e6  # the scale of the returns in the huge-lr case (finite losses and gradients: applied updates)


def run_case(ws, overrides, data, *, checked=True, poison_tp_rank=None, poison_main_dp_rank=None,
             kinds=("actor", "critic"), return_scale=1.0):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.trainer.health import TrainingHalted
    from liteppo_mcore.update import ModelUpdater, TrainBatch, gather_over_dp

    cfg = load_config(overrides=BASE + overrides, world_size=ws)
    groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
    models = build_models(cfg, groups)
    per_rank = N // groups.dp_size
    rows = torch.arange(groups.dp_rank * per_rank, (groups.dp_rank + 1) * per_rank)
    local = TrainBatch(tokens=data["tokens"][rows], prompt_lens=data["prompt_lens"][rows],
                       response_lens=data["response_lens"][rows], advantages=data["advantages"][rows],
                       old_logp=data["logp_noise"][rows] - math.log(VOCAB),
                       ref_logp=data["ref_noise"][rows] - math.log(VOCAB), returns=data["returns"][rows] * return_scale,
                       old_values=data["old_values"][rows])
    batch = gather_over_dp(local, groups)
    out = {"metrics": {}, "weights": {}, "halted": None}
    for kind in kinds:
        model = getattr(models, kind)
        updater = ModelUpdater(model, kind, cfg, groups, vocab_size=VOCAB)
        if not checked:
            updater._check_weights = lambda step: None
        if poison_tp_rank is not None and kind == "actor":
            _poison_second_update(updater, dict(model.named_parameters())[POISONED],
                                  groups.tp_rank == poison_tp_rank)
        if poison_main_dp_rank is not None and kind == "actor":
            _poison_master_weights(updater, groups.dp_rank == poison_main_dp_rank)
        try:
            out["metrics"].update(updater.update(batch, step=STEP))
        except TrainingHalted as e:
            out["halted"] = {"kind": kind, "message": str(e), "exit_code": e.exit_code, "step": e.step,
                             "num_updates": updater.num_updates}
            break
        out["weights"][kind] = whole_state_dict(model, groups, VOCAB)
    destroy_model_parallel()
    return out


def _poison_second_update(updater, param, on_this_rank):
    """After the second applied step, one element of `param` becomes +inf, on this rank only."""
    step = updater.optimizer.step_with_ready_grads
    calls = []

    def poisoned():
        applied = step()
        calls.append(applied)
        if len(calls) == 2 and on_this_rank:
            with torch.no_grad():
                param.view(-1)[5] = float("inf")
        return applied

    updater.optimizer.step_with_ready_grads = poisoned


def _poison_master_weights(updater, on_this_rank):
    """After the inner optimizer's first step, one element of this rank's first fp32 master-weight
    shard becomes +inf, before megatron copies the master weights to the model and all-gathers them."""
    opt = getattr(updater.optimizer, "chained_optimizers", [updater.optimizer])[0]
    inner = opt.optimizer
    step = inner.step

    def poisoned(*args, **kwargs):
        out = step(*args, **kwargs)
        if on_this_rank:
            master = inner.param_groups[0]["params"][0]
            assert master.dtype == torch.float32 and master.numel() > 0
            with torch.no_grad():
                master.view(-1)[0] = float("inf")
        return out

    inner.step = poisoned


def worker(rank, ws, data):
    return {
        "checked": run_case(ws, TP2 + TWO_UPDATES, data),
        "unchecked": run_case(ws, TP2 + TWO_UPDATES, data, checked=False),
        "poisoned_tp1": run_case(ws, TP2 + TWO_UPDATES, data, poison_tp_rank=1),
        "huge_critic_lr": run_case(ws, TWO_UPDATES + [f"critic.lr={HUGE_LR}"], data, return_scale=LARGE),
        "master_bf16_distopt": run_case(ws, TWO_UPDATES + ["model.dtype=bf16", "train.optimizer=adamw",
                                                           "train.lr=0.001", "train.use_distributed_optimizer=true"],
                                        data, kinds=("actor",), poison_main_dp_rank=0),
    }


def test_nonfinite_weights_halt_every_rank_and_the_check_changes_nothing_else():
    data = make_step_batch(seed=2)
    ranks = run_gloo(worker, 2, data, timeout=400)

    # the normal path: bit-identical metrics and weights with and without the check
    for r in ranks:
        checked, unchecked = r["checked"], r["unchecked"]
        assert checked["halted"] is None and unchecked["halted"] is None
        assert checked["metrics"] == unchecked["metrics"]
        assert checked["metrics"]["actor/skipped_updates"] == 0 and checked["metrics"]["actor/grad_norm"] > 0
        for kind in ("actor", "critic"):
            assert checked["weights"][kind].keys() == unchecked["weights"][kind].keys()
            assert all(torch.equal(checked["weights"][kind][k], w) for k, w in unchecked["weights"][kind].items())

    # an infinity written on TP rank 1 only, in the second update: both ranks stop, naming it
    messages = set()
    for r in ranks:
        halted = r["poisoned_tp1"]["halted"]
        assert halted is not None and halted["kind"] == "actor" and halted["exit_code"] == 3
        assert halted["step"] == STEP + 1 and halted["num_updates"] == 2
        message = halted["message"]
        for needle in ("actor weights are not finite", "optimizer update 2", f"step {STEP + 1}", repr(POISONED),
                       "on rank 1 (tp 1, pp 0, cp 0, dp 0)", "rank 1 of 2 holds non-finite parameters",
                       "Lower train.lr", "resume from the last checkpoint"):
            assert needle in message, (needle, message)
        messages.add(message)
    assert len(messages) == 1  # every rank says the same

    # a learning rate past float32's range: the critic's first update, on both DP ranks
    for r in ranks:
        case = r["huge_critic_lr"]
        assert case["metrics"]["actor/skipped_updates"] == 0 and "actor" in case["weights"]
        halted = case["halted"]
        assert halted["kind"] == "critic" and halted["exit_code"] == 3 and halted["num_updates"] == 1
        for needle in ("critic weights are not finite", "optimizer update 1", f"step {STEP + 1}",
                       "ranks 0-1 of 2 hold non-finite parameters", "Lower critic.lr"):
            assert needle in halted["message"], (needle, halted["message"])

    # bf16 weights from fp32 master weights sharded over DP (ZeRO-1): DP rank 0's shard goes non-finite;
    # the parameter all-gather of the step brings it to rank 1's model, and both ranks stop
    for r in ranks:
        halted = r["master_bf16_distopt"]["halted"]
        assert halted["kind"] == "actor" and halted["num_updates"] == 1
        assert "ranks 0-1 of 2 hold non-finite parameters" in halted["message"], halted["message"]


def test_count_nonfinite_is_exact_in_every_dtype():
    from liteppo_mcore.update.optim import count_nonfinite, group_by_dtype

    big16 = torch.full((4096,), 60000.0, dtype=torch.float16)  # finite; its L2 norm overflows fp16
    assert not torch.isfinite(torch.linalg.vector_norm(big16)) and int(count_nonfinite([[big16]])) == 0
    tensors = [torch.randn(7), big16, torch.randn(3, 5, dtype=torch.bfloat16), torch.zeros(0)]
    assert int(count_nonfinite(group_by_dtype(tensors))) == 0
    assert int(count_nonfinite([])) == 0
    for value in (float("nan"), float("inf"), float("-inf")):
        for i in range(3):
            bad = [t.clone() for t in tensors]
            bad[i].view(-1)[-1] = value
            assert int(count_nonfinite(group_by_dtype(bad))) == 1, (value, i)
    both = [t.clone() for t in tensors]
    both[0][0], both[2][1, 1] = float("nan"), float("inf")
    assert int(count_nonfinite(group_by_dtype(both))) == 2
