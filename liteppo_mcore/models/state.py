"""Moving weights between a whole (unsharded, TP=1/PP=1) state dict and this rank's shards.

A whole state dict uses megatron's names with global layer numbers and the real (unpadded)
vocabulary. Sharding follows the attributes megatron puts on each parameter (`partition_dim`,
`partition_stride`), so fused QKV (grouped by query group) and the gate/up pair of `linear_fc1`
(stride 2) are split exactly as megatron's own initialization splits them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from liteppo_mcore.parallel.mcore import ParallelGroups

if TYPE_CHECKING:  # only for an annotation
    from megatron.core.transformer.transformer_block import TransformerBlock

_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> whole-model name (layer numbers made global)."""
    decoder: TransformerBlock = model.decoder  # a megatron GPTModel's (actor and critic alike)
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}
    names = {}
    for name, _ in _local_tensors(model):
        m = _LAYER.match(name)
        names[name] = f"decoder.layers.{offsets[int(m.group(1))]}.{m.group(2)}" if m else name
    return names


def _local_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    for name, buf in model.named_buffers():
        if buf is not None and buf.is_floating_point() and "inv_freq" not in name:
            yield name, buf


def _is_vocab_tensor(key: str, tensor: Tensor) -> bool:
    """The embedding or output layer over the (padded, vocab-parallel) vocabulary; not the critic's
    value head, which megatron also addresses as output_layer.weight."""
    return key in _VOCAB_KEYS and bool(getattr(tensor, "tensor_model_parallel", False))


def shard_of(full: Tensor, param: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This TP rank's piece of `full`, as megatron splits it for `param`."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim  # type: ignore[attr-defined]  # megatron's tensor-parallel attribute
    stride = getattr(param, "partition_stride", 1)
    piece = full.shape[dim] // (tp_size * stride)
    pieces = torch.split(full, piece, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def unshard(parts: list, param: Tensor) -> Tensor:
    """Inverse of shard_of: the whole tensor from every TP rank's piece (in TP rank order)."""
    if len(parts) == 1 or not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    dim = param.partition_dim  # type: ignore[attr-defined]  # megatron's tensor-parallel attribute
    stride = getattr(param, "partition_stride", 1)
    split = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([split[r][k] for k in range(stride) for r in range(len(parts))], dim=dim)


def _fit_vocab(full: Tensor, rows: int, vocab_size: int) -> Tensor:
    """Real vocabulary rows of `full`, zero-padded to `rows` (this layout's padded vocabulary)."""
    out = torch.zeros(rows, *full.shape[1:], dtype=full.dtype)
    out[:vocab_size] = full[:vocab_size]
    return out


@torch.no_grad()
def load_whole_state_dict(model: torch.nn.Module, whole: Mapping[str, Tensor], groups: ParallelGroups,
                          vocab_size: int) -> None:
    """Copy a whole-model state dict into this rank's shards (any TP/PP layout)."""
    names = _global_names(model)
    missing = []
    for name, tensor in _local_tensors(model):
        key = names[name]
        if key not in whole and key == "output_layer.weight":
            key = "embedding.word_embeddings.weight"  # tied embeddings
        if key not in whole:
            missing.append(key)
            continue
        full = whole[key]
        if _is_vocab_tensor(key, tensor):
            full = _fit_vocab(full, tensor.shape[0] * groups.tp_size, vocab_size)
        shard = shard_of(full, tensor, groups.tp_rank, groups.tp_size)
        if shard.shape != tensor.shape:
            raise ValueError(f"{key}: a whole tensor of shape {tuple(full.shape)} gives a shard of "
                             f"{tuple(shard.shape)}, but this rank holds {tuple(tensor.shape)}")
        tensor.copy_(shard.to(tensor.dtype))
    if missing:
        raise KeyError(f"the whole state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")


@torch.no_grad()
def whole_state_dict(model: torch.nn.Module, groups: ParallelGroups, vocab_size: int) -> dict[str, Tensor]:
    """This model as a whole state dict of host tensors, assembled on every rank (TP all-gather, PP
    all-gather of the stages' tensors). Meant for tests and small models; the rollout exporter streams
    instead."""
    import torch.distributed as dist

    names = _global_names(model)
    mine: dict[str, Tensor] = {}
    for name, tensor in _local_tensors(model):
        if groups.tp_size > 1 and getattr(tensor, "tensor_model_parallel", False):
            parts = [torch.empty_like(tensor) for _ in range(groups.tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.tp_group)
            full = unshard(parts, tensor)
        else:
            full = tensor.detach().clone()
        key = names[name]
        if key == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
            continue  # the last stage's copy of tied embeddings
        if _is_vocab_tensor(key, tensor):
            full = full[:vocab_size].clone()
        mine[key] = full.cpu()  # host tensors: for saving, comparing and sending as objects
    if groups.pp_size == 1:
        return mine
    stages: list = [None] * groups.pp_size
    dist.all_gather_object(stages, mine, group=groups.pp_group)
    whole: dict[str, Tensor] = {}
    for stage in stages:
        for key, value in stage.items():
            whole.setdefault(key, value)
    return whole
