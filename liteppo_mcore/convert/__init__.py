"""Hugging Face <-> megatron-core tensor names and layouts (pure tensor code, no megatron).

The one place that knows how Qwen2/2.5, Qwen3 and Llama tensors map onto megatron's GPT: the
checkpoint converters and the rollout weight sync both use it.
"""

from liteppo_mcore.convert.hf_files import (
                                            SafetensorsReader,
                                            ShardedSafetensorsWriter,
                                            config_dtype,
                                            copy_side_files,
                                            hf_config_from_shape,
                                            normalize_config,
                                            parse_size,
                                            read_config,
)
from liteppo_mcore.convert.layout import ConversionError, TensorLayout, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from liteppo_mcore.convert.names import Source, canonical_name, hf_shapes, megatron_sources, to_hf, to_megatron
from liteppo_mcore.convert.weights import MegatronView, check_hf_tensors, hf_tensors

__all__ = [
    "ConversionError", "MegatronView", "SafetensorsReader", "ShardedSafetensorsWriter", "Source", "TensorLayout",
    "canonical_name", "check_hf_tensors", "config_dtype", "copy_side_files", "fuse_gate_up", "fuse_qkv",
    "hf_config_from_shape", "hf_shapes", "hf_tensors", "megatron_sources", "normalize_config", "parse_size",
    "read_config", "split_gate_up", "split_qkv", "to_hf", "to_megatron",
]
