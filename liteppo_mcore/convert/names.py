"""The one name map between Hugging Face (Qwen2/2.5, Qwen3, Llama) and megatron-core GPT tensors.

Megatron names are those of a whole model (TP=1, PP=1: global layer numbers, real vocabulary), as in
`models/state.py`. Each megatron tensor comes from one HF tensor (copied) or from several (fused:
q/k/v into `linear_qkv`, gate/up into `linear_fc1`); `Source` says which, with the HF shapes the
config implies, so a wrong checkpoint is caught by name before any copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from liteppo_mcore.convert.layout import ConversionError, TensorLayout, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv

COPY, QKV, GATE_UP = "copy", "qkv", "gate_up"

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

# Transformer Engine's spec fuses each norm into the linear after it; same tensors, other names.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Source:
    """Where one megatron tensor comes from: HF tensors (in fusion order), their shapes, how to fuse."""

    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str = COPY

    @property
    def megatron_shape(self) -> tuple[int, ...]:
        """Fused tensors stack their parts along the output dimension."""
        first = self.hf_shapes[0]
        return (sum(s[0] for s in self.hf_shapes),) + tuple(first[1:])


def _layer_sources(i: int, lay: TensorLayout) -> dict[str, Source]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    a = h + "self_attn."
    hidden, ffn, d = lay.hidden_size, lay.ffn_hidden_size, lay.head_dim
    qkv_shapes = ((lay.q_size, hidden), (lay.kv_size, hidden), (lay.kv_size, hidden))
    out = {
        m + "input_layernorm.weight": Source((h + "input_layernorm.weight",), ((hidden,),)),
        m + "self_attention.linear_qkv.weight": Source(
            (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), qkv_shapes, QKV),
        m + "self_attention.linear_proj.weight": Source((a + "o_proj.weight",), ((hidden, lay.q_size),)),
        m + "pre_mlp_layernorm.weight": Source((h + "post_attention_layernorm.weight",), ((hidden,),)),
        m + "mlp.linear_fc1.weight": Source((h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                                            ((ffn, hidden), (ffn, hidden)), GATE_UP),
        m + "mlp.linear_fc2.weight": Source((h + "mlp.down_proj.weight",), ((hidden, ffn),)),
    }
    if lay.qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = Source(
            (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            ((lay.q_size,), (lay.kv_size,), (lay.kv_size,)), QKV)
    if lay.qk_norm:
        out[m + "self_attention.q_layernorm.weight"] = Source((a + "q_norm.weight",), ((d,),))
        out[m + "self_attention.k_layernorm.weight"] = Source((a + "k_norm.weight",), ((d,),))
    return out


def megatron_sources(layout: TensorLayout) -> dict[str, Source]:
    """Every tensor of the whole megatron model, in model order, with its HF source."""
    vocab_shape = ((layout.vocab_size, layout.hidden_size),)
    sources = {EMBEDDING: Source((HF_EMBEDDING,), vocab_shape)}
    for i in range(layout.num_layers):
        sources.update(_layer_sources(i, layout))
    sources["decoder.final_layernorm.weight"] = Source(("model.norm.weight",), ((layout.hidden_size,),))
    if not layout.tie_word_embeddings:
        sources[OUTPUT_LAYER] = Source((HF_LM_HEAD,), vocab_shape)
    return sources


def hf_shapes(layout: TensorLayout) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the layout needs, with its shape."""
    return {name: shape for src in megatron_sources(layout).values()
            for name, shape in zip(src.hf_names, src.hf_shapes)}


def ignored_hf_name(name: str, layout: TensorLayout) -> bool:
    """HF tensors a conversion may skip: rotary caches of old checkpoints, and a stored copy of the
    tied output layer (Hugging Face itself replaces it by the embedding)."""
    return name.endswith("rotary_emb.inv_freq") or (layout.tie_word_embeddings and name == HF_LM_HEAD)


def canonical_name(name: str) -> str:
    """The local-spec megatron name of `name` (Transformer Engine's norm names mapped back)."""
    for te_suffix, local_suffix in TE_ALIASES.items():
        if name.endswith("." + te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


def to_megatron(source: Source, tensors: Sequence[Tensor], layout: TensorLayout) -> Tensor:
    """The whole megatron tensor from the HF tensors of `source` (in its order)."""
    if source.kind == QKV:
        return fuse_qkv(tensors[0], tensors[1], tensors[2], layout)
    if source.kind == GATE_UP:
        return fuse_gate_up(tensors[0], tensors[1])
    return tensors[0]


def to_hf(name: str, tensor: Tensor, layout: TensorLayout, sources: dict[str, Source]) -> list[tuple[str, Tensor]]:
    """The HF tensors of one whole megatron tensor (`sources` = megatron_sources(layout))."""
    source = sources.get(canonical_name(name))
    if source is None:
        raise ConversionError(f"megatron tensor {name!r} has no Hugging Face counterpart in this layout "
                              f"(qkv_bias={layout.qkv_bias}, qk_norm={layout.qk_norm}, "
                              f"tie_word_embeddings={layout.tie_word_embeddings}). Is the stored config.json "
                              "the one this checkpoint was trained with?")
    if tuple(tensor.shape) != source.megatron_shape:
        raise ConversionError(f"megatron tensor {name} has shape {list(tensor.shape)} but the stored config.json "
                              f"implies {list(source.megatron_shape)}. Is the stored config.json the one this "
                              "checkpoint was trained with?")
    if source.kind == QKV:
        parts: Sequence[Tensor] = split_qkv(tensor, layout)
    elif source.kind == GATE_UP:
        parts = split_gate_up(tensor)
    else:
        parts = (tensor,)
    return list(zip(source.hf_names, parts))
