"""Checkpoints: megatron-core distributed checkpoints keyed by model, Hugging Face conversion both
ways, and the actor's pretrained starting point (see paths.py for the on-disk layout)."""

from liteppo_mcore.checkpoint.conversion import convert_hf_to_mcore, convert_mcore_to_hf
from liteppo_mcore.checkpoint.paths import (
                                            CheckpointError,
                                            checkpoints_dir,
                                            iter_name,
                                            iteration_dir,
                                            read_latest,
                                            resolve_iteration_dir,
                                            write_latest,
)
from liteppo_mcore.checkpoint.pretrained import (
                                            load_actor_from_hf,
                                            load_pretrained_actor,
                                            pretrained_shape,
                                            save_converted_actor,
)
from liteppo_mcore.checkpoint.store import (
                                            load_model,
                                            read_checkpoint_config,
                                            save_checkpoint,
                                            sharded_model_state,
                                            write_hf_side,
)

__all__ = [
    "CheckpointError", "checkpoints_dir", "convert_hf_to_mcore", "convert_mcore_to_hf", "iter_name", "iteration_dir",
    "load_actor_from_hf", "load_model", "load_pretrained_actor", "pretrained_shape", "read_checkpoint_config",
    "read_latest", "resolve_iteration_dir", "save_checkpoint", "save_converted_actor", "sharded_model_state",
    "write_hf_side", "write_latest",
]
