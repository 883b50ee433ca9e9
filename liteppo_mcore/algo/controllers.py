"""KL coefficient controllers for the token-level KL penalty (semantics section 2).

``target_kl: None`` gives a fixed ``beta = init_kl_coef``. Otherwise the adaptive rule of Ziegler et
al. (2019), applied once per step with ``KL_step`` (mean over responses of the per-response masked
mean KL, see ``kl.mean_of_sequence_means``) and ``N`` the global number of responses of the step::

    e    = clip(KL_step / target_kl - 1, -0.2, 0.2)
    beta = beta * (1 + e * N / horizon)

Both controllers are state (``beta``) that goes into the checkpoint.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

Number = float | int | Tensor


class FixedKLController:
    """``beta`` stays ``init_kl_coef``; ``update`` does nothing."""

    def __init__(self, init_kl_coef: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef!r}")
        self.value = float(init_kl_coef)

    def update(self, current_kl: Number, n_steps: int) -> None:
        """No-op: a fixed coefficient ignores the measured KL."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "value" not in state:
            raise ValueError("KL controller state is missing 'value'")
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller driving the measured KL towards ``target_kl`` (module docstring)."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        if not target_kl > 0:
            raise ValueError(f"target_kl must be > 0 for the adaptive controller, got {target_kl!r}")
        if not horizon > 0:
            raise ValueError(f"kl horizon must be > 0, got {horizon!r}")
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: Number, n_steps: int) -> None:
        """``beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon)``."""
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    init_kl_coef: float, target_kl: float | None, horizon: float
) -> FixedKLController:
    """The controller the configuration asks for: fixed when ``target_kl`` is None, else adaptive."""
    if target_kl is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target_kl, horizon)
