"""Megatron models under the strict virtual-device mode: every parameter where megatron puts its own
(on the device), the value head in fp32, and a batch built on the host reaching the model only through
the forward passes, which hand host results back. Bug (b) of the mode's own tests: a host batch fed
straight to a device model fails."""

import torch

from tests.distributed.spawn import run_gloo

VOCAB = 50
BASE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=48", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64",
        "rollout_batch_size=2", "num_return_sequences_in_group=2", "train.mini_batch_size=4",
        "train.micro_batch_size=2", "adv_estimator=gae", "use_kl_loss=true", "model.family=qwen3"]


def strict_worker(rank, world_size, run_dir):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.parallel.strict_device import StrictDeviceError, is_active, is_device

    cfg = load_config(overrides=BASE, world_size=world_size)
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    models = build_models(cfg, groups)
    out = {"strict": is_active()}
    out["host_params"] = [f"{kind}.{name}" for kind in ("actor", "critic", "reference")
                          for name, p in getattr(models, kind).named_parameters() if not is_device(p)]
    out["host_buffers"] = [name for name, b in models.actor.named_buffers() if not is_device(b)]
    out["value_head_dtype"] = str(models.critic.output_layer.weight.dtype)
    tokens = torch.randint(0, VOCAB, (2, 9))
    batch = SequenceBatch(tokens, torch.tensor([3, 4]), torch.tensor([6, 2]))
    try:
        models.actor(tokens, None, attention_mask=None)  # the bug: host tokens into a device model
        out["host_batch"] = "passed"
    except StrictDeviceError as e:
        out["host_batch"] = str(e).splitlines()[0]
    res = forward_per_token(models.actor, batch, groups, vocab_size=VOCAB, micro_batch_size=2)
    values = forward_per_token(models.critic, batch, groups, kind="critic", vocab_size=VOCAB, micro_batch_size=1)
    out["results_on_host"] = [not is_device(v) for v in (*res.values(), *values.values())]
    out["logp_finite"] = bool(torch.isfinite(res["logp"]).all())
    # forward-only passes cut the batch like training: longest first, at most max_tokens padded tokens
    shapes = []
    hook = models.actor.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    lens = torch.tensor([3, 7, 2, 5])
    long_batch = SequenceBatch(torch.randint(0, VOCAB, (4, 12)), lens, 12 - lens - torch.tensor([0, 1, 2, 3]))
    bounded = forward_per_token(models.actor, long_batch, groups, vocab_size=VOCAB, micro_batch_size=4,
                                max_tokens_per_micro_batch=24)
    hook.remove()
    whole = forward_per_token(models.actor, long_batch, groups, vocab_size=VOCAB, micro_batch_size=4)
    out["micro_shapes"] = shapes
    out["bounded_equals_whole"] = max((bounded[k] - whole[k]).abs().max().item() for k in bounded)
    # the critic saves and loads (megatron addresses its output layer as output_layer.weight / .bias)
    from liteppo_mcore.checkpoint.store import load_model, save_checkpoint, sharded_model_state

    head = models.critic.output_layer
    head.weight.data.normal_(0, 0.3)
    saved = head.weight.detach().cpu().clone()
    iter_dir = save_checkpoint(sharded_model_state({"critic": models.critic}), run_dir, 1,
                               hf_config={"architectures": ["Qwen3ForCausalLM"]})
    head.weight.data.zero_()
    load_model(models.critic, iter_dir, prefix="critic")
    out["critic_round_trip"] = torch.equal(head.weight.detach().cpu(), saved) and is_device(head.weight)
    destroy_model_parallel()
    return out


def bf16_critic_worker(rank, world_size):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.device import compute_device
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel

    cfg = load_config(overrides=BASE + ["model.dtype=bf16"], world_size=world_size)
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    models = build_models(cfg, groups)
    head = models.critic.output_layer
    head.weight.data.normal_(0, 0.3)
    values = models.critic(torch.randint(0, VOCAB, (2, 9)).to(compute_device()), None, attention_mask=None)
    out = {"trunk": str(models.critic.decoder.layers[0].mlp.linear_fc1.weight.dtype),
           "head": str(head.weight.dtype), "values": str(values.dtype)}
    destroy_model_parallel()
    return out


def test_models_are_placed_as_on_a_gpu_and_forward_passes_take_host_batches(tmp_path):
    (r,) = run_gloo(strict_worker, 1, str(tmp_path / "run"), env={"LITEPPO_STRICT_DEVICE": "1"})
    assert r["strict"]
    assert r["host_params"] == [] and r["host_buffers"] == []
    assert r["value_head_dtype"] == "torch.float32"
    assert r["host_batch"].startswith("Expected all tensors to be on the same device")
    assert r["results_on_host"] == [True, True, True] and r["logp_finite"]
    # sequence lengths 12, 11, 10, 9; at most 24 padded tokens -> [12, 11] padded to 12, [10, 9] to 10
    assert r["micro_shapes"] == [(2, 12), (2, 10)]
    assert r["bounded_equals_whole"] < 1e-5
    assert r["critic_round_trip"]


def test_value_head_is_fp32_in_a_bf16_critic():
    """In bf16 the values (and the value loss) would be quantized to steps of 2^-8 of their magnitude."""
    (r,) = run_gloo(bf16_critic_worker, 1, env={"LITEPPO_STRICT_DEVICE": "1"})
    assert r == {"trunk": "torch.bfloat16", "head": "torch.float32", "values": "torch.float32"}
