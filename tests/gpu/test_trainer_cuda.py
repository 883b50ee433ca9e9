"""The trainer on the GPU, in this process (examples/tiny_cpu.yaml shrunk to 8 prompts x 8 responses):

- one step per rollout engine (hf, fast, mcore) x {no KL, KL loss, GAE critic, kl_penalty: full}, in bf16,
  with rollout.check_weight_sync: true: no skipped update, finite metrics, rollout/logprob_abs_diff under
  the stated bound (helpers.LOGPROB_DIFF_BOUND);
- the offload of optimizer states and the reference between phases on vs off: the same run;
- a save and a resume: the resumed run continues as the uninterrupted one did.

The matrix and the offload runs call `train_step()` directly (no checkpoint, which `fit()` writes at the
end); only the save-and-resume test saves.

Each run writes its metrics to LITEPPO_GPU_REPORT_DIR (tools/gpu_check.sh collects them)."""

import pytest

from tests.gpu import helpers as H

pytestmark = H.gpu_marks()


@pytest.mark.parametrize("variant", list(H.VARIANTS))
@pytest.mark.parametrize("engine", H.ENGINES)
def test_one_step_per_engine_and_variant(process_group, tmp_path, engine, variant):
    dtype = H.dtypes()[0]
    rows, synced = H.run_trainer(H.trainer_overrides(str(tmp_path), engine=engine, variant=variant, dtype=dtype),
                                 inspect=lambda t: t.exporter is not None, train_steps=1)
    diffs = [r.get("rollout/logprob_abs_diff") for r in rows if r.get("step", 0) > 0]
    H.write_report(f"trainer_{engine}_{variant}", {"dtype": dtype, "logprob_abs_diff": diffs,
                                                   "bound": H.LOGPROB_DIFF_BOUND[dtype], "metrics": rows})
    assert synced == (engine != "mcore")  # the mcore engine decodes with the live actor: nothing to sync
    problems = H.step_problems(rows, steps=1, logprob_bound=H.LOGPROB_DIFF_BOUND[dtype],
                               critic=variant == "gae_critic")
    assert problems == [], problems
    if variant == "kl_penalty_full":
        assert "kl/mean" in rows[-1]


def _optimizer_state_devices(updater):
    """Device types of the optimizer's state tensors (Adam moments), 0-d step counters left out."""
    devices = set()
    for opt in getattr(updater.optimizer, "chained_optimizers", [updater.optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else ()):
            devices |= {v.device.type for v in state.values() if hasattr(v, "device") and v.dim() > 0}
    return sorted(devices)


def test_offload_on_and_off_give_the_same_run(process_group, tmp_path):
    """Two steps (the second update uses Adam moments that went to the host and back) with the actor,
    critic and reference: metrics and final weights agree within fp32 run-to-run noise."""
    from liteppo_mcore.parallel.device import on_gpu

    runs = {}
    for offload in (True, False):
        overrides = H.trainer_overrides(str(tmp_path / f"offload_{offload}"), engine="hf", variant="gae_critic",
                                        dtype="fp32", steps=2,
                                        extra=["use_kl_loss=true",
                                               f"train.offload_between_phases={str(offload).lower()}"])

        def inspect(t):
            return {"weights": H.flat_parameters(t.models.actor, t.models.critic), "active": t.actor.offload,
                    "actor_state": _optimizer_state_devices(t.actor),
                    "critic_state": _optimizer_state_devices(t.critic),
                    "reference": sorted({p.device.type for p in t.models.reference.parameters()})}

        runs[offload] = H.run_trainer(overrides, inspect=inspect, train_steps=2)
    (rows_on, on), (rows_off, off) = runs[True], runs[False]
    weight_diff = float((on["weights"] - off["weights"]).abs().max())
    mismatches = [f"step {a.get('step')}: {d}" for a, b in zip(rows_on, rows_off)
                  for d in H.differences(H.comparable(a), H.comparable(b), rel=H.SAME_RUN_REL, abs_=H.SAME_RUN_ABS)]
    H.write_report("offload_on_vs_off", {"max_abs_weight_diff": weight_diff, "metric_mismatches": mismatches,
                                         "on": {k: v for k, v in on.items() if k != "weights"},
                                         "off": {k: v for k, v in off.items() if k != "weights"}})
    if on_gpu():  # the offload did happen (it does nothing where everything lives on the CPU anyway)
        assert on["active"] and not off["active"]
        assert (on["actor_state"], on["critic_state"], on["reference"]) == (["cpu"], ["cpu"], ["cpu"])
        assert (off["actor_state"], off["critic_state"], off["reference"]) == (["cuda"], ["cuda"], ["cuda"])
    assert H.step_problems(rows_on, steps=2, logprob_bound=H.LOGPROB_DIFF_BOUND["fp32"], critic=True) == []
    assert len(rows_on) == len(rows_off) and mismatches == []
    assert weight_diff <= H.SAME_WEIGHTS_MAX_ABS


@pytest.mark.parametrize("variant", ["kl_loss", "gae_critic"])
def test_save_and_resume(process_group, tmp_path, variant):
    """An uninterrupted 2-step run against 1 step, a checkpoint, and a resume to step 2 (fp32): actor and
    reference (KL loss), or actor and critic (GAE), with their optimizers."""
    import os

    def overrides(run_dir, steps):
        return H.trainer_overrides(run_dir, engine="fast", variant=variant, dtype="fp32", steps=steps,
                                   save_interval=1)

    def weights_of(t):
        return H.flat_parameters(t.models.actor, t.models.critic)

    full = str(tmp_path / "full")
    rows_full, weights_full = H.run_trainer(overrides(full, 2), inspect=weights_of)
    part = str(tmp_path / "resumed")
    H.run_trainer(overrides(part, 1))
    assert open(os.path.join(part, "checkpoints", "latest")).read().strip() == "iter_0000001"
    rows, (step_at_start, weights) = H.run_trainer(overrides(part, 2), inspect=lambda t: (t.step, weights_of(t)))
    resumed = [r for r in rows if r["step"] == 2]
    want = [r for r in rows_full if r["step"] == 2]
    mismatches = H.differences(H.comparable(resumed[0]), H.comparable(want[0]), rel=H.SAME_RUN_REL,
                               abs_=H.SAME_RUN_ABS) if resumed and want else ["no step-2 row"]
    weight_diff = float((weights - weights_full).abs().max())
    H.write_report(f"save_and_resume_{variant}", {"metric_mismatches": mismatches, "max_abs_weight_diff": weight_diff})
    assert step_at_start == 2 and [r["step"] for r in rows] == [1, 2]  # step 1 from the first run's file
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["iter_0000001", "iter_0000002", "latest"]
    assert mismatches == [] and weight_diff <= H.SAME_WEIGHTS_MAX_ABS
