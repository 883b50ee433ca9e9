"""`critic.load`: a PPO run's critic (trunk and value head) starts from another run's checkpoint, at any
layout; without it the critic is the actor's starting trunk with a value head at zero; a folder that is
not a checkpoint is a CheckpointError naming it."""

import os

from tests.distributed.spawn import run_gloo

CONFIG = "examples/tiny_cpu.yaml"
SMALL = ["adv_estimator=gae", "critic.lr=1e-3", "rollout_batch_size=8", "num_return_sequences_in_group=4",
         "train.mini_batch_size=32", "train.micro_batch_size=8", "eval.enabled=false", "logging.tensorboard=false",
         "logging.plot=false", "logging.num_sample_completions=0", "reward.num_workers=1", "max_steps=2"]


def _critic_values(models, groups, vocab_size):
    """The critic's values on fixed sequences (layout-independent up to rounding)."""
    import torch

    from liteppo_mcore.models.forward import SequenceBatch, forward_per_token

    tokens = torch.randint(0, vocab_size, (4, 12), generator=torch.Generator().manual_seed(3))
    batch = SequenceBatch(tokens, torch.full((4,), 6), torch.tensor([6, 5, 3, 1]))
    return forward_per_token(models.critic, batch, groups, kind="critic", vocab_size=vocab_size,
                             micro_batch_size=4)["values"].tolist()


def _train_then_load(rank, world, root):
    from liteppo_mcore.checkpoint.paths import CheckpointError
    from liteppo_mcore.checkpoint.pretrained import build_pretrained_models
    from liteppo_mcore.config import load_config
    from liteppo_mcore.parallel.mcore import destroy_model_parallel, initialize_model_parallel
    from liteppo_mcore.trainer.loop import Trainer

    trained = os.path.join(root, "trained")
    trainer = Trainer(load_config(CONFIG, [*SMALL, f"output_dir={trained}"], world_size=world))
    try:
        trainer.fit()
        vocab = trainer.vocab_size
        want = _critic_values(trainer.models, trainer.groups, vocab)
    finally:
        trainer.close()

    out = {"want": want}
    for name, extra in (("loaded", [f"critic.load={trained}"]), ("fresh", []), ("tp2", [f"critic.load={trained}"])):
        if name == "tp2" and world < 2:
            continue
        layout = ["parallel.tp=2"] if name == "tp2" else []
        cfg = load_config(CONFIG, [*SMALL, *layout, *extra, f"output_dir={root}/{name}"], world_size=world)
        groups = initialize_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed)
        try:
            models = build_pretrained_models(cfg, groups, vocab_size=vocab)
            out[name] = _critic_values(models, groups, vocab)
            out[name + "_head_is_zero"] = all(float(p.abs().max()) == 0.0
                                              for p in models.critic.output_layer.parameters())
        finally:
            destroy_model_parallel()
    cfg = load_config(CONFIG, [*SMALL, f"critic.load={root}/nowhere", f"output_dir={root}/bad"], world_size=world)
    groups = initialize_model_parallel(1, 1, 1, seed=cfg.seed)
    try:
        build_pretrained_models(cfg, groups, vocab_size=vocab)
        out["bad"] = None
    except CheckpointError as e:
        out["bad"] = str(e)
    finally:
        destroy_model_parallel()
    return out


def test_the_critic_starts_from_the_checkpoint_at_any_layout(tmp_path):
    import torch

    out = run_gloo(_train_then_load, 2, str(tmp_path), timeout=900)[0]
    torch.testing.assert_close(torch.tensor(out["loaded"]), torch.tensor(out["want"]), rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(out["tp2"]), torch.tensor(out["want"]), rtol=2e-4, atol=1e-6)
    assert not out["loaded_head_is_zero"] and out["fresh_head_is_zero"]  # trained value head vs a new one
    assert torch.tensor(out["fresh"]).abs().max() == 0  # a fresh critic's values are 0 (value head at zero)
    assert "nowhere" in out["bad"], out["bad"]
