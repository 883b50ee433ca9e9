"""Models on the GPU: the actor built for each attention backend (sdpa, local, and te when it imports) x
distributed optimizer on/off x bf16/fp32, every parameter on the device, one update (forward/backward
through megatron's schedule + optimizer step) with a finite loss; the forward passes of
`models/forward.py` from host-built batches, bf16 against the same weights in fp32 (stated bounds in
helpers.py)."""

import math

import pytest
import torch

from tests.gpu import helpers as H

pytestmark = H.gpu_marks()

VOCAB = 256
BASE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64",
        "rollout_batch_size=2", "num_return_sequences_in_group=4", "train.mini_batch_size=8",
        "train.micro_batch_size=4", "adv_estimator=reinforce", "use_kl_loss=false", "parallel.backend=auto",
        "train.optimizer=adamw", "train.lr=1e-3", "prompt_length=8", "response_length=16", "output_dir=unused"]


def _config(*extra):
    from liteppo_mcore.config import load_config

    return load_config(overrides=BASE + list(extra), world_size=1)


def _batch(n=8, seed=0):
    """A host-built batch of prompt + response sequences of different lengths, one advantage each."""
    from liteppo_mcore.update import TrainBatch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, 9, (n,), generator=g)
    responses = torch.randint(1, 17, (n,), generator=g)
    responses[0] = 16
    tokens = torch.randint(0, VOCAB, (n, int((prompts + responses).max())), generator=g)
    advantages = torch.randn(n, 1, generator=g).expand(n, int(responses.max())).contiguous()
    return TrainBatch(tokens=tokens, prompt_lens=prompts, response_lens=responses, advantages=advantages)


def _host_parameters(model):
    """Parameters not on the device (none may be, where tensors are placed as on a GPU)."""
    from liteppo_mcore.parallel.device import on_gpu

    return [n for n, p in model.named_parameters() if on_gpu() and p.device.type != "cuda"]


@pytest.mark.parametrize("dtype", H.dtypes())
@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "dist_adam"])
@pytest.mark.parametrize("backend", H.attention_backends())
def test_build_and_one_update(groups, backend, distributed_optimizer, dtype):
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.update import ModelUpdater

    cfg = _config(f"model.attention_backend={backend}", f"model.dtype={dtype}",
                  f"train.use_distributed_optimizer={str(distributed_optimizer).lower()}",
                  f"train.pack_sequences={'false' if backend == 'local' else 'true'}")  # local takes no packing
    models = build_models(cfg, groups)
    assert _host_parameters(models.actor) == []
    assert {p.dtype for p in models.actor.parameters()} == {torch.bfloat16 if dtype == "bf16" else torch.float32}
    before = H.flat_parameters(models.actor)
    updater = ModelUpdater(models.actor, "actor", cfg, groups, vocab_size=VOCAB)
    metrics = updater.update(_batch(), step=0)
    H.write_report(f"models_{backend}_{'dist' if distributed_optimizer else 'adam'}_{dtype}",
                   {k: v for k, v in metrics.items()})
    assert metrics["actor/skipped_updates"] == 0 and updater.num_updates == 1
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["actor/grad_norm"] > 0
    assert not torch.equal(before, H.flat_parameters(models.actor))  # the step changed the weights


def test_forward_passes_bf16_against_fp32(groups):
    from liteppo_mcore.models.forward import SequenceBatch, forward_full_kl, forward_per_token
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.models.state import load_whole_state_dict, whole_state_dict

    bf16 = build_models(_config("model.dtype=bf16", "use_kl_loss=true"), groups)
    fp32 = build_models(_config("model.dtype=fp32", "use_kl_loss=true"), groups)
    torch.manual_seed(0)
    with torch.no_grad():  # the policy moves away from the reference, so the exact KL is not zero
        for p in bf16.actor.parameters():
            p.add_(torch.randn(p.shape, device=p.device, dtype=torch.float32).to(p.dtype) * 0.01)
    for src, dst in ((bf16.actor, fp32.actor), (bf16.reference, fp32.reference)):
        whole = {k: v.float() for k, v in whole_state_dict(src, groups, VOCAB).items()}
        load_whole_state_dict(dst, whole, groups, VOCAB)  # bf16 values are exact in fp32

    data = _batch(seed=1)
    batch = SequenceBatch(tokens=data.tokens, prompt_lens=data.prompt_lens, response_lens=data.response_lens)
    mask = torch.arange(batch.response_width())[None, :] < batch.response_lens[:, None]
    kw = dict(vocab_size=VOCAB, micro_batch_size=3, temperature=0.9)
    got = forward_per_token(bf16.actor, batch, groups, **kw)
    want = forward_per_token(fp32.actor, batch, groups, **kw)
    kl_got = forward_full_kl(bf16.actor, bf16.reference, batch, groups, **kw)
    kl_want = forward_full_kl(fp32.actor, fp32.reference, batch, groups, **kw)
    report = {}
    for key, a, b in (("logp", got["logp"], want["logp"]), ("entropy", got["entropy"], want["entropy"]),
                      ("full_kl", kl_got, kl_want)):
        assert a.device.type == "cpu" and a.dtype == torch.float32 and a.shape == mask.shape  # host results
        diff = (a - b).abs()[mask]
        report[key] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                       "fp32_mean": float(b[mask].mean()), "finite": bool(torch.isfinite(a[mask]).all())}
    H.write_report("forward_bf16_vs_fp32", report)
    for key in ("logp", "entropy"):
        assert report[key]["finite"]
        assert report[key]["max_abs"] <= H.BF16_LOGP_MAX_ABS, (key, report[key])
        assert report[key]["mean_abs"] <= H.BF16_LOGP_MEAN_ABS, (key, report[key])
    assert report["full_kl"]["finite"] and report["full_kl"]["fp32_mean"] > 0
    assert report["full_kl"]["max_abs"] <= H.BF16_FULL_KL_MAX_ABS, report["full_kl"]
    assert float(kl_want[mask].min()) >= -1e-6  # an exact KL is never negative
