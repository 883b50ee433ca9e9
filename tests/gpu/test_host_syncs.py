"""Host synchronisations of one trainer step (fast engine with CUDA graphs, KL loss, bf16), counted with
`torch.cuda.set_sync_debug_mode("warn")`: every synchronising CUDA call warns, and the warnings give the
call sites. Recorded (LITEPPO_GPU_REPORT_DIR/host_syncs.json, and in tools/gpu_check.sh's summary), not
bounded: no bound on their number is stated yet. A warm-up step runs first, so one-time work (graph
capture, allocations, the first optimizer step) is not counted."""

import warnings

import torch

from tests.gpu import helpers as H

pytestmark = H.gpu_marks(cuda_only=True)


def test_host_syncs_of_one_step_are_recorded(process_group, tmp_path):
    def measured_step(trainer):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                metrics = trainer.train_step(trainer.step + 1).metrics
            finally:
                torch.cuda.set_sync_debug_mode(0)
        trainer.step += 1
        return metrics, H.summarize_sync_warnings(records)

    overrides = H.trainer_overrides(str(tmp_path), engine="fast", variant="kl_loss", dtype="bf16", steps=2)
    rows, (metrics, syncs) = H.run_trainer(overrides, inspect=measured_step, train_steps=1)
    syncs["step"] = 2
    syncs["setup"] = "fast engine (CUDA graphs), KL loss, bf16, 8 prompts x 8 responses, one update"
    H.write_report("host_syncs", syncs)
    print(f"host syncs in one step: {syncs['total']} at {syncs['distinct_sites']} sites")
    for site in syncs["sites"][:20]:
        print(f"  {site['count']:5d}  {site['site']}")
    assert torch.cuda.get_sync_debug_mode() == 0
    assert metrics["actor/skipped_updates"] == 0 and rows[0]["actor/skipped_updates"] == 0
    assert syncs["total"] >= sum(site["count"] for site in syncs["sites"])  # the top sites of all of them
