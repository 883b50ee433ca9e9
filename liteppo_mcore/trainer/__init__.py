"""The RLVR step loop (`loop.py`). Nothing inside the package imports it; the entry point calls
`run_training`."""

from __future__ import annotations


def _user_errors() -> tuple:
    """Exceptions that mean bad input (paths, data, checkpoints, servers), reported without a traceback."""
    from liteppo_mcore.checkpoint.paths import CheckpointError
    from liteppo_mcore.config.validate import ConfigError
    from liteppo_mcore.convert.layout import ConversionError
    from liteppo_mcore.data.errors import DataError
    from liteppo_mcore.models.shapes import ModelShapeError
    from liteppo_mcore.rewards.registry import RewardError
    from liteppo_mcore.rollout import RolloutEngineError
    from liteppo_mcore.rollout.sglang import SGLangServerError, SGLangVersionError

    return (CheckpointError, ConfigError, ConversionError, DataError, ModelShapeError, RewardError,
            RolloutEngineError, SGLangServerError, SGLangVersionError)


def __getattr__(name):
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(name)


def run_training(cfg) -> int:
    """Run training for `cfg` on this process (its process group set up: parallel.setup.init_distributed);
    returns the process exit status."""
    from liteppo_mcore.trainer.loop import run_training as run

    return run(cfg)
