"""Model shapes: from the YAML `model` section or a Hugging Face `config.json`, per family.

The family decides the architecture details that are not free: Qwen2/2.5 has a QKV bias, Qwen3 has
per-head q/k RMSNorm and an explicit head_dim, Llama has neither (and Llama 3 may scale rope).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any

from liteppo_mcore.config.schema import ModelConfig

# Hugging Face architecture name -> our family: one entry per config.choices.MODEL_FAMILIES
# (tests/unit/test_config_choices.py).
HF_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}


class ModelShapeError(ValueError):
    """A model description that this project cannot build, with what to do about it."""


@dataclass(frozen=True)
class ModelShape:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_epsilon: float
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Vocabulary padded so that every TP rank holds an equal, aligned shard."""
        multiple = divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_layout(self, tp: int, pp: int) -> None:
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"parallel.tp={tp} must divide the {self.num_attention_heads} attention heads")
        if self.num_query_groups % tp:
            problems.append(f"parallel.tp={tp} must divide the {self.num_query_groups} key/value heads")
        if self.num_layers % pp:
            problems.append(f"parallel.pp={pp} must divide the {self.num_layers} layers")
        if problems:
            raise ModelShapeError("; ".join(problems) + ". Pick parallel sizes that divide the model's shape.")


def shape_from_config(model: ModelConfig, vocab_size: int | None = None) -> ModelShape:
    """The shape of the YAML `model` section (used when no hf_path is set)."""
    vocab = model.vocab_size if model.vocab_size is not None else vocab_size
    if vocab is None:
        raise ModelShapeError("model.vocab_size is null and no tokenizer gave a vocabulary size. "
                              "Set model.vocab_size, or model.tokenizer_path / data.builtin_task.")
    return ModelShape(
        family=model.family, num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, head_dim=model.hidden_size // model.num_attention_heads,
        vocab_size=vocab, max_position_embeddings=model.max_position_embeddings, rope_theta=model.rope_theta,
        norm_epsilon=model.norm_epsilon, tie_word_embeddings=model.tie_word_embeddings,
        rope_scaling=dict(model.rope_scaling) if model.rope_scaling else None)


def _require(cfg: dict[str, Any], key: str, path: str) -> Any:
    if key not in cfg:
        raise ModelShapeError(f"{path}: missing field `{key}`. Is this a complete Hugging Face config.json?")
    return cfg[key]


def shape_from_hf_config(hf: dict[str, Any], path: str = "config.json") -> ModelShape:
    """The shape of a Hugging Face config (a dict read from config.json, either rope format)."""
    from liteppo_mcore.convert.hf_files import normalize_config

    hf = normalize_config(hf)
    archs = hf.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        supported = ", ".join(sorted(HF_ARCHITECTURES))
        raise ModelShapeError(f"{path}: architectures={archs} is not supported. Supported: {supported} "
                              "(Qwen2/2.5, Qwen3, Llama 2/3).")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ModelShapeError(f"{path}: Llama with attention_bias/mlp_bias is not supported.")
    heads = _require(hf, "num_attention_heads", path)
    hidden = _require(hf, "hidden_size", path)
    scaling = hf.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise ModelShapeError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 is).")
        scaling = None if kind == "default" else dict(scaling)
    return ModelShape(
        family=family, num_layers=_require(hf, "num_hidden_layers", path), hidden_size=hidden,
        ffn_hidden_size=_require(hf, "intermediate_size", path), num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads, vocab_size=_require(hf, "vocab_size", path),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=scaling)


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelShapeError(f"model.hf_path={hf_dir}: no config.json there. Point it at a Hugging Face "
                              "model directory (config.json + *.safetensors + tokenizer files).")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def resolve_shape(model: ModelConfig, vocab_size: int | None = None) -> ModelShape:
    """The shape to build: from model.hf_path when set, else from the YAML section."""
    if model.hf_path:
        shape = shape_from_hf_config(read_hf_config(model.hf_path), os.path.join(model.hf_path, "config.json"))
        return replace(shape, vocab_size=model.vocab_size) if model.vocab_size else shape
    return shape_from_config(model, vocab_size)
