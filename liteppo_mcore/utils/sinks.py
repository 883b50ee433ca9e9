"""Where step metrics go: `metrics.jsonl` (one JSON object per step), TensorBoard, W&B when asked.

Only one rank writes (the trainer passes `enabled=False` elsewhere). Every line is flushed, so a run
killed mid-way keeps what it logged. A resumed run passes the step it resumed at: rows of later steps
(logged by the interrupted run after its checkpoint, and about to be run again) are dropped from
`metrics.jsonl` and `samples.jsonl` (rewritten whole, then renamed) and TensorBoard purges them, so
every step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsWriter:
    """Append-only sinks for `{name: float}` per step."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None,
                 resume_step: int | None = None) -> None:
        """`resume_step`: the step of the checkpoint the run continues from (None: a fresh start,
        which drops every row an earlier attempt left)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        last = -1 if resume_step is None else resume_step
        for name in ("metrics.jsonl", SAMPLES_FILE):
            drop_rows_after(os.path.join(run_dir, name), last)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = os.path.join(run_dir, "tensorboard")
            purge = last + 1 if os.path.isdir(tb_dir) else None  # events at steps >= purge are hidden
            self._tb = SummaryWriter(log_dir=tb_dir, purge_step=purge)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("logging.wandb_project is set but wandb is not installed: not logging to W&B")
            else:
                self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_value(float(v)) for k, v in sorted(metrics.items())}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


SAMPLES_FILE = "samples.jsonl"


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of `path` (JSON lines with a "step") whose step is past `step`, by writing
    the kept ones to a temporary file and renaming it over `path`. Returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except ValueError:
                dropped += 1  # a line cut short by a kill
                continue
            if isinstance(row_step, int) and row_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, title: str | None = None) -> str | None:
    """Reward and held-out accuracy over steps, as a PNG titled `title` (default: the run directory's
    name); None when there is nothing to plot."""
    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    series = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
              for key in ("reward/mean", "eval/accuracy")}
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = metrics_figure(series, title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def metrics_figure(series: dict[str, list[Any]], title: str):
    """The plot of `series` ({metric: [(step, value), ...]}): steps across, the metric's value up."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
