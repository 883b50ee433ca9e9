"""The PPO update through megatron-core's schedules: mini-batches and micro-batches of a step's
responses, the actor and critic losses with global denominators, DDP, the optimizer and the LR
schedule. See `updater.ModelUpdater`."""

from liteppo_mcore.models.microbatch import plan_micro_batches
from liteppo_mcore.update.batch import TrainBatch, gather_over_dp, minibatch_indices, rank_share
from liteppo_mcore.update.loss import Denominators, LossSettings
from liteppo_mcore.update.optim import OptimSettings, learning_rate
from liteppo_mcore.update.updater import ModelUpdater

__all__ = ["Denominators", "LossSettings", "ModelUpdater", "OptimSettings", "TrainBatch", "gather_over_dp",
           "learning_rate", "minibatch_indices", "plan_micro_batches", "rank_share"]
