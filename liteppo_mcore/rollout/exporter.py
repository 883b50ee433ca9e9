"""The weight exporter: the actor's megatron shards as a stream of (Hugging Face name, full tensor) pairs.

A rollout engine that holds its own copy of the weights (hf, sglang) needs them after every update, in
Hugging Face names and layouts. Gathering the whole model first would need a second model's worth of
memory, so the exporter streams: one whole megatron tensor at a time is TP all-gathered (fused QKV by
query group and the gate/up pair of `linear_fc1` with `partition_stride=2`, as `models.state.unshard`
reassembles them), broadcast over the pipeline group from the stage that owns it (global layer
numbers), trimmed to the real vocabulary, split into its Hugging Face tensors by the maps of
`liteppo_mcore.convert`, and added to a bucket; a bucket is handed out before it would exceed
`bucket_bytes`. A tied output layer is never sent (Hugging Face ties it to the embedding).

The plan (names, shapes, dtypes, owning stage) is computed once, at construction, with one small
collective; after that every rank of the job iterates the same buckets (each tensor is a TP
all-gather and a PP broadcast, so all ranks must iterate, and to the end). Every rank receives every
full tensor; which ranks feed an engine is the engine's business.

Memory: the exporter holds the current bucket plus the tensor in flight, which at its largest is two
copies of it (its gathered TP shards and the reassembled tensor, vocabulary padding included). A
bucket is handed out before the next tensor is gathered unless the bucket plus that tensor's in-flight
copies stay within `bucket_bytes` plus the tensor itself, so the peak is at most one bucket plus one
tensor (`max(bucket_bytes, largest tensor) + largest tensor`), and a bucket never exceeds
`bucket_bytes` unless a single tensor does. `peak_bytes` reports what was actually held during the
last iteration, for tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.convert.layout import ConversionError, TensorLayout
from liteppo_mcore.convert.names import EMBEDDING, OUTPUT_LAYER, Source, canonical_name, megatron_sources, to_hf
from liteppo_mcore.models.state import unshard
from liteppo_mcore.parallel.device import compute_device
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import WeightBucket

if TYPE_CHECKING:  # only for an annotation
    from megatron.core.transformer.transformer_block import TransformerBlock

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_VOCAB_NAMES = (EMBEDDING, OUTPUT_LAYER)


@dataclass(frozen=True)
class ExportItem:
    """One whole megatron tensor of the stream: where it lives and what it becomes."""

    name: str                       # whole-model megatron name (global layer number, local-spec names)
    owner_stage: int                # pipeline stage that holds it
    local_name: str | None       # this rank's parameter name (None off the owning stage)
    shape: tuple[int, ...]          # whole shape, real vocabulary
    dtype: torch.dtype              # dtype it is sent in
    source: Source                  # its Hugging Face tensors
    gathered_bytes: int             # bytes of the whole tensor as gathered (vocabulary padding included)

    @property
    def nbytes(self) -> int:
        """Bytes it takes in a bucket."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    @property
    def inflight_bytes(self) -> int:
        """Most bytes held while it is built: two copies (shards + reassembled, or whole + its parts)."""
        return 2 * max(self.nbytes, self.gathered_bytes)


def whole_parameter_names(model: torch.nn.Module) -> dict[str, str]:
    """This rank's parameter name -> whole-model megatron name (global layer number, TE norm names
    mapped to the local spec's). Layer numbers come from the layers themselves, so any PP split works."""
    decoder: TransformerBlock = model.decoder  # a megatron GPTModel's (actor and critic alike)
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}
    names = {}
    for name, _ in model.named_parameters():
        m = _LAYER.match(name)
        whole = f"decoder.layers.{offsets[int(m.group(1))]}.{m.group(2)}" if m else name
        names[name] = canonical_name(whole)
    return names


class WeightExporter:
    """Streams the actor's weights as Hugging Face (name, full tensor) buckets; see the module doc.

    Args:
        model: this rank's actor (its pipeline stage and TP shard).
        groups: this rank's parallel groups.
        shape: the model shape (`models.shapes.ModelShape`): fixes names, shapes, the real vocabulary.
        bucket_bytes: most bytes of one bucket (a single larger tensor travels alone).
        dtype: dtype the tensors are sent in (default: the parameters' own).
    """

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups, shape, bucket_bytes: int,
                 dtype: torch.dtype | None = None):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes} (rollout.weight_sync_bucket_mb)")
        self.groups, self.bucket_bytes = groups, int(bucket_bytes)
        self.layout = TensorLayout.from_shape(shape)
        self._sources = megatron_sources(self.layout)
        self._params = dict(model.named_parameters())
        self._device = compute_device()  # where the model lives (a parameter's device need not tell)
        self.items = self._plan(model, dtype)
        self.peak_bytes = 0  # most bytes held at once by the last full iteration of buckets()

    # ------------------------------------------------------------------ plan
    def _plan(self, model: torch.nn.Module, dtype: torch.dtype | None) -> list[ExportItem]:
        tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
        local: dict[str, str] = {}
        for local_name, whole in whole_parameter_names(model).items():
            if whole == OUTPUT_LAYER and tied:
                continue  # the last stage's copy of the tied embedding
            if whole not in self._sources:
                raise ConversionError(f"actor parameter {local_name} ({whole}) has no Hugging Face counterpart "
                                      "for this model shape; the exporter and the actor disagree on the shape.")
            local[whole] = local_name
        mine = {whole: (str(self._params[name].dtype), self._gathered_bytes(self._params[name]))
                for whole, name in local.items()}
        stages = [mine]
        if self.groups.pp_size > 1:
            every_stage: list[Any] = [None] * self.groups.pp_size
            dist.all_gather_object(every_stage, mine, group=self.groups.pp_group)
            stages = every_stage  # each stage's `mine`
        items = []
        for whole, source in self._sources.items():
            owners = [s for s, names in enumerate(stages) if whole in names]
            if not owners:
                raise ConversionError(f"no pipeline stage holds {whole}; the actor was not built for this shape.")
            stage = owners[0]
            dtype_name, gathered = stages[stage][whole]
            items.append(ExportItem(name=whole, owner_stage=stage,
                                    local_name=local.get(whole) if stage == self.groups.pp_rank else None,
                                    shape=source.megatron_shape,
                                    dtype=dtype or getattr(torch, dtype_name.replace("torch.", "")),
                                    source=source, gathered_bytes=gathered))
        return items

    def _gathered_bytes(self, param: Tensor) -> int:
        tp = self.groups.tp_size if getattr(param, "tensor_model_parallel", False) else 1
        return param.numel() * tp * param.element_size()

    def hf_plan(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(Hugging Face name, shape, dtype) of every tensor the stream carries, in stream order."""
        return [(name, shape, item.dtype) for item in self.items
                for name, shape in zip(item.source.hf_names, item.source.hf_shapes)]

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    @property
    def max_tensor_bytes(self) -> int:
        """The largest whole tensor, as sent or as gathered (vocabulary padding included)."""
        return max(max(item.nbytes, item.gathered_bytes) for item in self.items)

    # ------------------------------------------------------------------ stream
    def buckets(self) -> Iterator[WeightBucket]:
        """The stream, bucket by bucket (collective: every rank iterates it to the end)."""
        self.peak_bytes = 0
        bucket: WeightBucket = []
        held = 0
        for item in self.items:
            # the tensor's in-flight copies beyond its own bytes must fit beside the bucket
            if bucket and held + item.inflight_bytes - item.nbytes > self.bucket_bytes:
                out, bucket, held = bucket, [], 0
                yield out
                del out
            full = self._whole(item, held)
            parts = to_hf(item.name, full, self.layout, self._sources)
            self._observe(held + _nbytes(full) + sum(_nbytes(t) for _, t in parts if t is not full))
            del full
            bucket.extend(parts)
            held += item.nbytes
        if bucket:
            yield bucket

    def _observe(self, nbytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, nbytes)

    @torch.no_grad()
    def _whole(self, item: ExportItem, held: int) -> Tensor:
        """The whole tensor of `item` on every rank: TP all-gather on the owning stage, trimmed to the
        real vocabulary, then broadcast over the pipeline group. A fresh tensor, never a parameter."""
        g = self.groups
        if item.owner_stage == g.pp_rank:
            assert item.local_name is not None  # set on the owning stage (see _plan)
            full = self._gathered(self._params[item.local_name], held)
            if item.name in _VOCAB_NAMES and full.shape[0] != self.layout.vocab_size:
                if full.shape[0] < self.layout.vocab_size:
                    raise ConversionError(f"{item.name} has {full.shape[0]} rows, fewer than the vocabulary "
                                          f"({self.layout.vocab_size}).")
                trimmed = full[: self.layout.vocab_size].clone()
                self._observe(held + _nbytes(full) + _nbytes(trimmed))
                full = trimmed
            if full.dtype != item.dtype:
                cast = full.to(item.dtype)
                self._observe(held + _nbytes(full) + _nbytes(cast))
                full = cast
            if tuple(full.shape) != item.shape:
                raise ConversionError(f"{item.name}: the actor holds a whole tensor of shape {list(full.shape)}, "
                                      f"the model shape implies {list(item.shape)}.")
        else:
            full = torch.empty(item.shape, dtype=item.dtype, device=self._device)
            self._observe(held + _nbytes(full))
        if g.pp_size > 1:
            assert g.pp_group is not None  # a group of more than one rank is never None (see ParallelGroups)
            src = dist.get_global_rank(g.pp_group, item.owner_stage)
            dist.broadcast(full, src=src, group=g.pp_group)
        return full

    def _gathered(self, param: Tensor, held: int) -> Tensor:
        """The whole tensor of one parameter from every TP rank's shard (a copy)."""
        g = self.groups
        if g.tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
            full = param.detach().clone()
            self._observe(held + _nbytes(full))
            return full
        shard = param.detach().contiguous()
        parts = [torch.empty_like(shard) for _ in range(g.tp_size)]
        dist.all_gather(parts, shard, group=g.tp_group)
        full = unshard(parts, param)
        self._observe(held + sum(_nbytes(p) for p in parts) + _nbytes(full))
        return full


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
