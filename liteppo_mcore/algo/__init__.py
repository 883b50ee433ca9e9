"""The LitePPO/PPO/GRPO maths as pure functions on tensors (torch only).

Shapes: ``[N]`` or ``[B]`` per response, ``[B, T]`` per response-token position with ``mask`` 1 on
valid response tokens (bool or 0/1 numbers). Statistics that must cover the global batch take an
``allreduce_sum`` callable (element-wise sum over the right ranks; ``None`` = one process holds the
whole batch), built by ``liteppo_mcore.parallel``. No process-group code lives here.
"""

from liteppo_mcore.config.choices import ADV_ESTIMATORS, REWARD_NORMS
from liteppo_mcore.config.choices import KL_ESTIMATORS as KL_KINDS
from liteppo_mcore.config.choices import LOSS_AGG_MODES as AGG_MODES

from .advantages import compute_advantages, compute_gae, compute_returns, compute_rloo, masked_whiten
from .aggregation import aggregate
from .controllers import AdaptiveKLController, FixedKLController, make_kl_controller
from .kl import kl_estimate, mean_of_sequence_means, token_level_rewards
from .losses import policy_loss, rollout_importance_weight, value_loss
from .normalization import RunningMoments, normalize_rewards
from .stats import AllReduceSum, Moments, as_bool_mask, global_moments

__all__ = [
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "KL_KINDS",
    "REWARD_NORMS",
    "AdaptiveKLController",
    "AllReduceSum",
    "FixedKLController",
    "Moments",
    "RunningMoments",
    "aggregate",
    "as_bool_mask",
    "compute_advantages",
    "compute_gae",
    "compute_returns",
    "compute_rloo",
    "global_moments",
    "kl_estimate",
    "make_kl_controller",
    "masked_whiten",
    "mean_of_sequence_means",
    "normalize_rewards",
    "policy_loss",
    "rollout_importance_weight",
    "token_level_rewards",
    "value_loss",
]
