"""Console step line, metric sinks and the plot."""

import os

from liteppo_mcore.utils.console import format_duration, step_line
from liteppo_mcore.utils.sinks import MetricsWriter, metrics_figure, plot_metrics, read_metrics
from liteppo_mcore.utils.timers import PhaseTimer


def test_step_line_reads_like_the_house_style():
    line = step_line(12, 500, {"reward/mean": 0.41, "kl/mean": 0.002, "actor/clipfrac": 0.08,
                               "response_length/mean": 812.0}, 41.0, 3 * 3600 + 2 * 60)
    assert line == "step 12/500 | reward 0.410 | kl 0.0020 | clipfrac 0.080 | len 812.0 | 41.0 s/step | eta 3h02m"
    assert format_duration(75) == "1m15s" and format_duration(float("nan")) == "?"


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    w = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True)
    w.write(0, {"eval/accuracy": 0.1})
    w.write(1, {"reward/mean": 0.2, "actor/pg_loss": float("nan")})
    w.write(2, {"reward/mean": 0.5, "eval/accuracy": 0.7})
    w.close()
    rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["actor/pg_loss"] is None
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    png = plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "plot.png"))
    assert png and os.path.getsize(png) > 1000
    fig = metrics_figure({"reward/mean": [(1, 0.2), (2, 0.5)], "eval/accuracy": [(0, 0.1)]}, "run-a")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "reward / accuracy", "run-a")
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["eval/accuracy", "reward/mean"]
    off = MetricsWriter(str(tmp_path / "other"), enabled=False)
    off.write(0, {"x": 1.0})
    assert not os.path.exists(tmp_path / "other")


def test_phase_timer_accumulates_and_resets():
    t = PhaseTimer()
    with t("rollout"):
        sum(range(1000))
    with t("rollout"):
        pass
    m = t.metrics()
    assert set(m) == {"time/rollout"} and m["time/rollout"] >= 0 and t.metrics() == {}


def test_progress_bar_counts_and_stays_quiet_off_a_terminal(capsys):
    from liteppo_mcore.utils.console import progress

    with progress(10, "rollout", enabled=True) as bar:
        bar.update(4)
        bar.update(6)
        assert bar.n == 10
    assert "rollout" in capsys.readouterr().err
    with progress(10, "rollout") as quiet:  # pytest's stderr is not a terminal
        quiet.update(10)
    assert "rollout" not in capsys.readouterr().err


def test_the_run_summary_tells_the_story(tmp_path):
    from liteppo_mcore.utils.console import run_summary

    w = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
    for step, acc in [(0, 0.0), (50, 0.8), (100, 0.74)]:
        w.write(step, {"eval/accuracy": acc})
    w.close()
    text = run_summary(str(tmp_path), str(tmp_path / "metrics.jsonl"), steps=100, seconds=52.14, last_checkpoint=100)
    first, outputs, export = text.splitlines()
    assert first == ("liteppo: done: 100 steps in 52.1 s; eval/accuracy 0.000 (step 0) -> 0.740 (step 100), "
                     "best 0.800 at step 50")
    assert outputs == f"liteppo: outputs in {tmp_path}: metrics.jsonl"
    ckpt = tmp_path / "checkpoints" / "iter_0000100"
    assert export.endswith(f"python tools/convert_mcore_to_hf.py --ckpt {ckpt} --out {tmp_path / 'hf'}")
    assert "eval/accuracy" not in run_summary(str(tmp_path), str(tmp_path / "none.jsonl"), steps=1, seconds=1.0,
                                              last_checkpoint=None)


def test_mix_seed_is_stable_order_sensitive_and_collision_free():
    from liteppo_mcore.utils.seeds import mix_seed

    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert mix_seed(1, 2) != mix_seed(2, 1) and mix_seed(1, 0) != mix_seed(0, 1)
    seeds = {mix_seed(7, step, rank) for step in range(200) for rank in range(8)}
    assert len(seeds) == 1600 and all(0 <= s < 2**63 for s in seeds)
