"""Where step metrics go: `metrics.jsonl` (one JSON object per step), TensorBoard, W&B when asked.

Only one rank writes (the trainer passes `enabled=False` elsewhere). Every line is flushed, so a run
killed mid-way keeps what it logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsWriter:
    """Append-only sinks for `{name: float}` per step."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[Dict[str, Any]] = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("logging.wandb_project is set but wandb is not installed: not logging to W&B")
            else:
                self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config)

    def write(self, step: int, metrics: Dict[str, float]) -> None:
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

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_png: str) -> Optional[str]:
    """Reward and held-out accuracy over steps, as a PNG; None when there is nothing to plot."""
    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    series = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
              for key in ("reward/mean", "eval/accuracy")}
    if not any(series.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, label=key)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
