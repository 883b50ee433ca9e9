"""Console output from one rank: the per-step line and a progress bar for long phases."""

from __future__ import annotations

import math
import os
import sys

import torch.distributed as dist


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only, flushed (torchrun interleaves the ranks' output otherwise)."""
    if is_main_rank():
        print(*args, **kwargs, flush=True)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def step_line(step: int, max_steps: int, metrics: dict[str, float], step_s: float, eta_s: float) -> str:
    """`step 12/500 | reward 0.41 | kl 0.002 | clipfrac 0.08 | len 812 | 41 s/step | eta 3h02m`."""
    parts = [f"step {step}/{max_steps}"]
    for label, key, fmt in (("reward", "reward/mean", ".3f"), ("kl", "kl/mean", ".4f"),
                            ("clipfrac", "actor/clipfrac", ".3f"), ("len", "response_length/mean", ".1f"),
                            ("acc", "eval/accuracy", ".3f")):
        if key in metrics:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    parts.append(f"{step_s:.1f} s/step")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def progress(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar on rank 0 when stderr is a terminal (a no-op elsewhere)."""
    from tqdm import tqdm

    # Only on a terminal: in a job log (torchrun, SLURM) the redraws would be lines of noise.
    show = (is_main_rank() and sys.stderr.isatty()) if enabled is None else enabled
    return tqdm(total=total, desc=desc, disable=not show, leave=False, file=sys.stderr, dynamic_ncols=True)


def run_summary(run_dir: str, metrics_path: str, *, steps: int, seconds: float,
                last_checkpoint: int | None) -> str:
    """What a finished run prints: steps and time, held-out accuracy first -> last (best), where the
    outputs are, and the command that exports the last checkpoint to Hugging Face."""
    from liteppo_mcore.utils.sinks import read_metrics

    rows = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    lines = [f"liteppo: done: {steps} steps in {seconds:.1f} s"]
    if acc:
        best_step, best = max(acc, key=lambda p: (p[1], -p[0]))
        lines[0] += (f"; eval/accuracy {acc[0][1]:.3f} (step {acc[0][0]}) -> {acc[-1][1]:.3f} (step {acc[-1][0]}), "
                     f"best {best:.3f} at step {best_step}")
    names = [n for n in ("metrics.jsonl", "tensorboard", "samples.jsonl", "reward_accuracy.png")
             if os.path.exists(os.path.join(run_dir, n))]
    lines.append(f"liteppo: outputs in {run_dir}: {', '.join(names)}")
    if last_checkpoint is not None:
        ckpt = os.path.join(run_dir, "checkpoints", f"iter_{last_checkpoint:07d}")
        lines.append(f"liteppo: last checkpoint {ckpt}; export it to Hugging Face with: "
                     f"python tools/convert_mcore_to_hf.py --ckpt {ckpt} --out {os.path.join(run_dir, 'hf')}")
    return "\n".join(lines)
