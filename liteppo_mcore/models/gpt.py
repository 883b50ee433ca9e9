"""Building the megatron-core GPT actor, the critic (same trunk + value head) and the frozen reference.

`build_actor` builds the actor of a shape (the layer spec and the dtype follow from the configuration);
`derive_models` adds the models that docs/semantics.md says exist, from the actor's starting weights:
the critic when `adv_estimator: gae`, the reference when `use_kl_loss` or `add_token_level_kl`.
`build_models(cfg, groups)` does both from random weights. Pretrained starting weights are the
checkpoint layer's business (it imports this module, never the other way round):
`checkpoint.pretrained.build_pretrained_models` builds the actor, loads it, then derives the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.models.output_head import install_hidden_states_output
from liteppo_mcore.models.rope import install as install_packed_rope
from liteppo_mcore.models.shapes import ModelShape, resolve_shape
from liteppo_mcore.models.spec import block_spec, choose_backend
from liteppo_mcore.parallel.device import compute_device, on_gpu
from liteppo_mcore.parallel.mcore import ParallelGroups

# model.dtype -> torch dtype: one entry per config.choices.EXPLICIT_DTYPES (tests/unit/test_config_choices.py).
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """auto -> bf16 on GPU, fp32 on CPU (bf16 matmuls on CPU are slow and the tests compare in fp32)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[name]


def transformer_config(shape: ModelShape, cfg: LitePPOConfig, dtype: torch.dtype) -> TransformerConfig:
    """megatron's TransformerConfig for `shape` under the configured layout. Dropout is 0 everywhere:
    PPO ratios must be exactly 1 before the first update, and trainer and engine log-probs must agree."""
    model_cfg, parallel = cfg.model, cfg.parallel
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads, num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim, normalization="RMSNorm", layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, init_method_std=model_cfg.init_std,
        # Always initialize, also before loading weights: with CPU initialization megatron sets the
        # tensor-parallel attributes (partition_dim, stride) only while drawing the random weights.
        use_cpu_initialization=not on_gpu(), perform_initialization=True,
        # Fusions: on CPU they would trigger torch.compile (slow start, nothing gained).
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method if model_cfg.recompute_granularity == "full" else None,
        recompute_num_layers=(model_cfg.recompute_num_layers if model_cfg.recompute_granularity == "full"
                              else None),
        deallocate_pipeline_outputs=False,
        cuda_graph_scope=[],  # megatron's default "full" means the same and warns that it is deprecated
        # Training losses arrive already divided by the GLOBAL token/sequence counts of the mini-batch
        # (update/loss.py): megatron must neither average them over micro-batches nor over DP.
        calculate_per_token_loss=True)


class ValueHead(MegatronModule):
    """hidden -> one value per token, replacing the critic's output layer; starts at zero.

    It is kept and computed in fp32 whatever the trunk's dtype: in bf16 the values (and the value loss
    built on them) would be quantized to steps of 2^-8 of their magnitude.

    The weight is replicated on every TP rank: the input hidden states are complete on each of them
    (gathered first under sequence parallelism), so every rank computes the same values and the same
    gradients, and no reduction over TP is needed.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        self.sequence_parallel = config.sequence_parallel
        # `weight` and `bias` directly (no inner Linear): megatron's checkpointing addresses the output
        # layer as `output_layer.weight` / `output_layer.bias`.
        device = module_device(config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=torch.float32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return F.linear(hidden_states.float(), self.weight, self.bias), None


def module_device(config: TransformerConfig) -> torch.device:
    """Where megatron puts a model's parameters (and so where ours must be made): the CPU with
    `use_cpu_initialization`, else this process's GPU."""
    return torch.device("cpu") if config.use_cpu_initialization else compute_device()


@dataclass
class Models:
    """The models of a run on this rank (this rank's shards)."""

    actor: GPTModel
    critic: GPTModel | None
    reference: GPTModel | None
    shape: ModelShape
    padded_vocab_size: int
    config: TransformerConfig


def build_gpt(shape: ModelShape, cfg: LitePPOConfig, groups: ParallelGroups, *, dtype: torch.dtype,
              padded_vocab: int, value_head: bool = False) -> GPTModel:
    """One GPT (this rank's pipeline stage and TP shard), with random weights from the seeded streams."""
    shape.check_layout(cfg.parallel.tp, cfg.parallel.pp)
    config = transformer_config(shape, cfg, dtype)
    backend = choose_backend(cfg.model.attention_backend, cfg.parallel.cp)
    n_stage = get_num_layers_to_build(config, vp_stage=None, pp_rank=groups.pp_rank)
    scaling = shape.rope_scaling or {}
    install_packed_rope()  # packed rows: the rotary embedding without megatron's per-segment loop (rope.py)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec(backend, shape.qk_norm, n_stage),
        vocab_size=padded_vocab, max_sequence_length=shape.max_position_embeddings,
        pre_process=groups.is_first_stage, post_process=groups.is_last_stage, parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings and not value_head,
        position_embedding_type="rope", rotary_base=int(shape.rope_theta),
        rope_scaling=bool(scaling), rope_scaling_factor=float(scaling.get("factor", 8.0)))
    if scaling:
        _apply_llama3_rope_scaling(model, shape)
    if value_head and groups.is_last_stage:
        model.output_layer = ValueHead(config)
    elif groups.is_last_stage:
        install_hidden_states_output(model)  # the log-prob passes never hold the whole logits (output_head.py)
    # As megatron's own get_model: the whole module on this process's device, buffers included.
    return model.to(compute_device())


def _apply_llama3_rope_scaling(model: GPTModel, shape: ModelShape) -> None:
    """megatron takes only the factor; Llama 3 configs also set the frequency bounds and the
    original context length, so recompute the inverse frequencies with all four."""
    s = shape.rope_scaling or {}
    rope = model.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    base = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rope.inv_freq = rope._apply_scaling(
        base.to(rope.inv_freq.device), factor=float(s.get("factor", 8.0)),
        low_freq_factor=float(s.get("low_freq_factor", 1.0)), high_freq_factor=float(s.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(s.get("original_max_position_embeddings", 8192)))


def build_actor(cfg: LitePPOConfig, groups: ParallelGroups, shape: ModelShape) -> GPTModel:
    """The actor of `shape` with random weights (`model.init_std`) under the configured layout and dtype."""
    return build_gpt(shape, cfg, groups, dtype=resolve_dtype(cfg.model.dtype), padded_vocab=_padded_vocab(cfg, shape))


def derive_models(actor: GPTModel, cfg: LitePPOConfig, groups: ParallelGroups, shape: ModelShape) -> Models:
    """The models of the configuration around `actor`, whose starting weights are final (loaded or random):
    the critic (gae) gets the actor's trunk and a value head at zero; the reference (a KL term) is a frozen
    copy of the actor."""
    dtype, padded = resolve_dtype(cfg.model.dtype), _padded_vocab(cfg, shape)
    critic = None
    if cfg.has_critic:
        critic = build_gpt(shape, cfg, groups, dtype=dtype, padded_vocab=padded, value_head=True)
        copy_trunk(actor, critic)
    reference = None
    if cfg.has_reference:
        # Modules hold process groups, which cannot be deep-copied: build a twin and copy the weights.
        reference = build_gpt(shape, cfg, groups, dtype=dtype, padded_vocab=padded)
        reference.load_state_dict(actor.state_dict())
        for param in reference.parameters():
            param.requires_grad_(False)
        reference.eval()
    return Models(actor=actor, critic=critic, reference=reference, shape=shape, padded_vocab_size=padded,
                  config=actor.config)


def build_models(cfg: LitePPOConfig, groups: ParallelGroups, *, vocab_size: int | None = None) -> Models:
    """Actor, and the critic / reference when the configuration implies them (see module doc), from
    random weights. The shape is the YAML's `model` section (`vocab_size` when it sets none).

    Pretrained weights (`model.load`, `model.hf_path`) are loaded by the checkpoint layer between the
    actor and its copies: `liteppo_mcore.checkpoint.pretrained.build_pretrained_models`."""
    if cfg.model.load or cfg.model.hf_path:
        raise ValueError("build_models builds from random weights; with model.load or model.hf_path use "
                         "liteppo_mcore.checkpoint.pretrained.build_pretrained_models(cfg, groups)")
    shape = resolve_shape(cfg.model, vocab_size)
    return derive_models(build_actor(cfg, groups, shape), cfg, groups, shape)


def _padded_vocab(cfg: LitePPOConfig, shape: ModelShape) -> int:
    return shape.padded_vocab_size(cfg.parallel.tp, cfg.model.make_vocab_size_divisible_by)


def copy_trunk(src: GPTModel, dst: GPTModel) -> None:
    """Copy every tensor the two models share by name and shape (embedding, layers, final norm)."""
    dst_state = dst.state_dict()
    with torch.no_grad():
        for name, tensor in src.state_dict().items():
            if name.startswith("output_layer.") or name not in dst_state:
                continue
            if isinstance(tensor, torch.Tensor) and dst_state[name].shape == tensor.shape:
                dst_state[name].copy_(tensor)
