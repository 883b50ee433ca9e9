"""The actor's output layer in the log-prob passes: it hands out the last hidden states instead of logits.

megatron's GPT ends with a column-parallel linear that turns the hidden states `[s, b, H]` into this TP
rank's logits `[s, b, V/TP]` (and the GPT model transposes them to `[b, s, V/TP]`, a second copy). At a
vocabulary of 151,936 and 16k tokens that is 5 GB in bf16 per copy, in every pass. Under
`hidden_states_out(model)` the output layer returns what it would have multiplied instead: the hidden
states after the same TP region as megatron's linear (copied to the TP region, or all-gathered over
the sequence under sequence parallelism, whose backward sums the ranks' shares), and it records the
weight it was to use (`used_weight`: its own, or the embedding's when tied, as megatron passes it).
`models/logprob.vocab_parallel_logprob_entropy_from_hidden` then computes log-probs and entropy in
chunks of rows with the matmul inside, and the weight gets its gradient exactly as through the linear.

Outside the context (rollouts of the in-process engines, evaluation) the layer is megatron's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from torch import Tensor


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the TP group. megatron's own
    (`copy_to_tensor_model_parallel_region`) all-reduces `grad.contiguous()` and returns `grad`: the
    gradient this layer's output receives is a transposed view (GPTModel transposes the output to
    `[b, s, ...]`), so there the sum would go to a copy and be lost."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class HiddenStatesOutputLayer(ColumnParallelLinear):
    """megatron's column-parallel output layer that, while `emit_hidden` is set, returns its input
    hidden states (in the TP region the logits would be in) and keeps the weight it would have used."""

    emit_hidden: bool = False
    used_weight: Tensor | None = None

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output: bool | None = None,
                **kwargs):
        if not self.emit_hidden:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        if self.bias is not None:
            raise ValueError("the hidden-states output layer takes no bias (GPT output layers have none)")
        used = self.weight if weight is None else weight
        if used is None:
            raise ValueError("the output layer has no weight of its own and none was passed (tied embeddings)")
        object.__setattr__(self, "used_weight", used)  # a reference, not a parameter of this module
        group = self.tp_group
        if self.sequence_parallel:
            # [s/tp, b, H] -> [s, b, H]; the backward reduce-scatters (sums) the ranks' shares, as the linear's does
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                input_, tensor_parallel_output_grad=True, group=group)
        elif group is not None and group.size() > 1:
            hidden = _CopyToTensorParallelRegion.apply(input_, group)
        else:
            hidden = input_
        return hidden, None


def install_hidden_states_output(model: torch.nn.Module) -> bool:
    """Make the GPT `model`'s output layer a `HiddenStatesOutputLayer` (same parameters, checkpoint keys
    and behaviour outside `hidden_states_out`). Returns False where there is none to change (a stage
    without the output layer, a value head)."""
    layer = getattr(model, "output_layer", None)
    if type(layer) is not ColumnParallelLinear:
        return isinstance(layer, HiddenStatesOutputLayer)
    layer.__class__ = HiddenStatesOutputLayer
    return True


def _output_layer(model: torch.nn.Module) -> HiddenStatesOutputLayer | None:
    """The model's hidden-states output layer (None: none), found once and remembered on the model."""
    cached = model.__dict__.get("_liteppo_output_layer", False)
    if cached is not False:
        return cached
    found = [m for m in model.modules() if isinstance(m, HiddenStatesOutputLayer)]
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} hidden-states output layers; expected one")
    layer = found[0] if found else None
    object.__setattr__(model, "_liteppo_output_layer", layer)  # a reference, not a submodule
    return layer


@contextmanager
def hidden_states_out(model: torch.nn.Module, *, enabled: bool = True) -> Iterator[HiddenStatesOutputLayer | None]:
    """While inside, `model` (a GPT, or a wrapper of one) returns `[b, s, H]` hidden states where it
    returned logits; yields its output layer, whose `used_weight` is the weight of the last forward
    (None on a pipeline stage without the output layer, where the model's output is unchanged)."""
    layer = _output_layer(model) if enabled else None
    if layer is None:
        if enabled and getattr(model, "post_process", None) and not _has_value_head(model):
            raise ValueError(f"{type(model).__name__}'s output layer is not a HiddenStatesOutputLayer: build the "
                             "model with models.gpt.build_gpt (or call install_hidden_states_output on it)")
        yield None
        return
    before = layer.emit_hidden
    layer.emit_hidden = True
    try:
        yield layer
    finally:
        layer.emit_hidden = before


def _has_value_head(model: torch.nn.Module) -> bool:
    from liteppo_mcore.models.gpt import ValueHead

    return any(isinstance(m, ValueHead) for m in model.modules())


def used_weight(layer: HiddenStatesOutputLayer | None) -> Tensor:
    """The output weight the last forward under `hidden_states_out` used."""
    if layer is None or layer.used_weight is None:
        raise RuntimeError("no forward ran under hidden_states_out on a stage with the output layer")
    return layer.used_weight
