"""Build the actor, critic and reference at a TP/PP/CP/DP layout and run them on a batch.

    torchrun --nproc_per_node 2 examples/models_forward.py

The embedded default's tiny model at TP=2 with a critic (gae) and a reference (KL loss); README.md
("Models and parallel layouts") shows this file, and the test suite runs it.
"""

import torch

from liteppo_mcore.config import load_config
from liteppo_mcore.models.forward import SequenceBatch, forward_per_token
from liteppo_mcore.models.gpt import build_models
from liteppo_mcore.parallel.mcore import initialize_model_parallel
from liteppo_mcore.parallel.setup import init_distributed, shutdown_distributed

cfg = load_config("examples/tiny_cpu.yaml", ["parallel.tp=2", "adv_estimator=gae", "use_kl_loss=true"])
layout = init_distributed(cfg)                      # nccl with CUDA, gloo without
groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
# The vocabulary size comes from the tokenizer (here: the built-in task's), model.vocab_size or model.hf_path.
models = build_models(cfg, groups, vocab_size=32)   # .actor, .critic (gae), .reference (KL)
# tokens [B, S]: prompt then response, right-padded; the same on every rank
tokens = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
batch = SequenceBatch(tokens=tokens, prompt_lens=torch.full((4,), 6), response_lens=torch.tensor([6, 5, 3, 1]))
kw = dict(vocab_size=models.shape.vocab_size, micro_batch_size=4)
out = forward_per_token(models.actor, batch, groups, temperature=cfg.rollout.temperature, **kw)  # logp, entropy
values = forward_per_token(models.critic, batch, groups, kind="critic", **kw)["values"]           # [B, T]
if layout.rank == 0:
    print(f"logp {tuple(out['logp'].shape)}, entropy {tuple(out['entropy'].shape)}, values {tuple(values.shape)}")
shutdown_distributed()
