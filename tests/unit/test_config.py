"""Configuration: root keys and defaults, loading, overrides, every validation rule, error messages."""

import dataclasses
import os
import re

import pytest

from liteppo_mcore.config import ConfigError, LitePPOConfig, load_config, suggest_key, to_yaml, validate
from liteppo_mcore.config.docs import config_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = [os.path.join(REPO, "examples", f) for f in sorted(os.listdir(os.path.join(REPO, "examples")))
            if f.endswith(".yaml")]

# Section 0 of the semantics: the published LitePPO block with its documented defaults
# (num_return_sequences_in_group: 8 on purpose), then the keys this project adds.
PUBLISHED_DEFAULTS = {
    "reward_norm": "group", "advantage_clip": 2.0, "token_level_loss": True, "reward_clip": None,
    "div_std_global": True, "dual_clip_loss": True, "rollout_batch_size": 512, "lambd": 0.95,
    "prompt_length": 2048, "gamma": 1.0, "response_length": 4096, "pg_clip": 0.2, "adv_estimator": "gae",
    "value_clip": None, "num_return_sequences_in_group": 8, "kl_penalty": "kl", "ppo_epochs": 1,
    "target_kl": None, "use_kl_loss": True, "init_kl_coef": 0.2, "kl_loss_coef": 0.001, "kl_horizon": 10000,
    "loss_agg_mode": "seq-mean-token-sum", "add_token_level_kl": False, "whiten_advantages": True,
    "reward_shift": False, "reward_scale": False,
}
ADDED_DEFAULTS = {"dual_clip_ratio": 3.0, "kl_loss_type": "k3", "entropy_coef": 0.0, "seed": 42, "pg_clip_low": None,
                  "pg_clip_high": None, "overlong_filter": False, "rollout_is": None, "rollout_is_threshold": 2.0,
                  "filter_groups": False, "filter_groups_max_rounds": 10}
SECTIONS = {"model", "parallel", "train", "rollout", "data", "reward", "critic", "checkpoint", "logging", "eval"}


def problems(overrides, world_size=1, config=None):
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides, world_size=world_size)
    return str(info.value)


def test_root_keys_are_exactly_the_published_block_plus_ours():
    assert len(PUBLISHED_DEFAULTS) == 27
    root = {f.name for f in dataclasses.fields(LitePPOConfig)}
    expected = set(PUBLISHED_DEFAULTS) | set(ADDED_DEFAULTS) | {"max_steps", "output_dir"} | SECTIONS
    assert root == expected


def test_defaults_are_the_documented_ones_and_validate():
    cfg = load_config(world_size=1)
    for key, value in {**PUBLISHED_DEFAULTS, **ADDED_DEFAULTS}.items():
        assert getattr(cfg, key) == value, key
    # The defaults describe PPO with a critic and a reference.
    assert cfg.has_critic and cfg.has_reference
    assert cfg.effective_loss_agg_mode == "token-mean"
    validate(LitePPOConfig(), world_size=1)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
@pytest.mark.parametrize("replicas", [1, 2, 8])
def test_examples_validate(path, replicas):
    """Each recipe validates with 1, 2 and 8 data-parallel replicas of its own model-parallel layout."""
    parallel = load_config(path, check=False).parallel
    load_config(path, world_size=replicas * parallel.tp * parallel.pp * parallel.cp)


def test_liteppo_example_is_paper_faithful():
    cfg = load_config(os.path.join(REPO, "examples", "liteppo.yaml"))
    assert cfg.adv_estimator == "reinforce" and not cfg.has_critic and not cfg.has_reference
    assert cfg.reward_norm == "group" and cfg.div_std_global and cfg.num_return_sequences_in_group == 8
    assert cfg.token_level_loss and not cfg.whiten_advantages and cfg.advantage_clip is None
    assert not cfg.dual_clip_loss
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp) == (1, 1, 1)
    gae = load_config(os.path.join(REPO, "examples", "ppo_gae.yaml"))
    assert gae.has_critic and gae.has_reference


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 7\ntrain:\n  lr: 3.0e-6\nmodel:\n  rope_scaling: {factor: 8.0}\n")
    cfg = load_config(str(path), ["train.lr=1e-5", "reward_clip=5", "reward_norm=null",
                                  "rollout.server_urls=[http://a:1,http://b:2]"])
    assert cfg.seed == 7
    assert cfg.train.lr == pytest.approx(1e-5)
    assert cfg.reward_clip == 5.0 and cfg.reward_norm is None
    assert cfg.model.rope_scaling == {"factor": 8.0}
    assert cfg.rollout.server_urls == ["http://a:1", "http://b:2"]
    # The printed YAML loads back to the same configuration.
    printed = tmp_path / "printed.yaml"
    printed.write_text(to_yaml(cfg))
    assert load_config(str(printed)) == cfg


@pytest.mark.parametrize("overrides, pattern", [
    (["reward_norm=median"], r"reward_norm=median: must be one of group, batch, running, null"),
    (["adv_estimator=ppo"], r"adv_estimator=ppo: must be one of gae, reinforce, grpo, rloo, reinforce_plus_plus"),
    (["rollout_is=tokens"], r"rollout_is=tokens: must be one of token, sequence, null"),
    (["rollout_is=token", "rollout_is_threshold=0.5"], r"rollout_is_threshold=0.5: must be >= 1"),
    (["filter_groups=true", "filter_groups_max_rounds=0"], r"filter_groups_max_rounds=0: must be a positive integer"),
    (["loss_agg_mode=mean"], r"loss_agg_mode=mean: must be one of token-mean, seq-mean-token-sum"),
    (["kl_penalty=js"], r"kl_penalty=js: must be one of kl, abs, mse, k3, full"),
    (["pg_clip_low=1.0"], r"pg_clip_low=1.0: must be in \(0, 1\) or null"),
    (["pg_clip_high=0"], r"pg_clip_high=0.0: must be a positive number or null"),
    (["kl_loss_type=full"], r"kl_loss_type=full: must be one of kl, abs, mse, k3\b"),
    (["rollout.engine=vllm"], r"rollout.engine=vllm: must be one of auto, mcore, hf, fast, sglang"),
    (["model.family=gpt2"], r"model.family=gpt2: must be one of qwen2, qwen3, llama"),
    (["rollout_batch_size=0"], r"rollout_batch_size=0: must be a positive integer"),
    (["response_length=-1"], r"response_length=-1: must be a positive integer"),
    (["ppo_epochs=0"], r"ppo_epochs=0: must be a positive integer"),
    (["pg_clip=0"], r"pg_clip=0.0: must be a positive number"),
    (["reward_clip=-1"], r"reward_clip=-1.0: must be a positive number or null"),
    (["gamma=1.5"], r"gamma=1.5: must be in \[0, 1\]"),
    (["lambd=-0.1"], r"lambd=-0.1: must be in \[0, 1\]"),
    (["kl_loss_coef=-1"], r"kl_loss_coef=-1.0: must be >= 0"),
    (["entropy_coef=-0.01"], r"entropy_coef=-0.01: must be >= 0"),
    (["dual_clip_ratio=1.0"], r"dual_clip_ratio=1.0: must be > 1"),
    (["rollout.temperature=0"], r"rollout.temperature=0.0: must be a positive number"),
    (["rollout.top_p=0"], r"rollout.top_p=0.0: must be in \(0, 1\]"),
    (["rollout.top_k=0"], r"rollout.top_k=0: must be -1 \(disabled\) or a positive integer"),
    (["train.adam_beta2=1.0"], r"train.adam_beta2=1.0: must be in \[0, 1\)"),
    (["train.min_lr=1", "train.lr=0.1"], r"train.min_lr=1.0: must not exceed train.lr"),
    (["parallel.timeout_minutes=0"], r"parallel.timeout_minutes=0.0: must be a positive number"),
    (["eval.num_samples=0"], r"eval.num_samples=0: must be a positive integer"),
    (["adv_estimator=reinforce", "critic.load=runs/ppo"],
     r"critic.load=runs/ppo: only adv_estimator=gae has a critic \(here: reinforce\)"),
])
def test_enum_and_range_rules(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides)


def test_group_norm_needs_a_group_of_two():
    msg = problems(["reward_norm=group", "num_return_sequences_in_group=1", "train.mini_batch_size=512"])
    assert "num_return_sequences_in_group=1" in msg
    assert "every normalized reward is 0" in msg and "Set num_return_sequences_in_group: 8" in msg
    # batch normalization with one response per prompt is fine
    load_config(overrides=["reward_norm=batch", "num_return_sequences_in_group=1", "train.mini_batch_size=512"])


@pytest.mark.parametrize("key", ["adv_estimator=rloo", "filter_groups=true"])
def test_leave_one_out_and_group_filter_need_a_group_of_two(key):
    msg = problems([key, "reward_norm=batch", "num_return_sequences_in_group=1", "train.mini_batch_size=512"])
    assert f"num_return_sequences_in_group=1: {key} needs num_return_sequences_in_group >= 2" in msg
    load_config(overrides=[key, "reward_norm=batch", "num_return_sequences_in_group=2", "train.mini_batch_size=512"])


def test_grpo_needs_group_norm():
    with pytest.raises(ConfigError, match=r"reward_norm=batch: adv_estimator=grpo needs reward_norm=group"):
        load_config(overrides=["adv_estimator=grpo", "reward_norm=batch"])
    load_config(overrides=["adv_estimator=grpo", "reward_norm=group"])


def test_shift_and_scale_are_exclusive():
    with pytest.raises(ConfigError, match=r"reward_shift and reward_scale are exclusive"):
        load_config(overrides=["reward_shift=true", "reward_scale=true"])
    load_config(overrides=["reward_shift=true"])
    load_config(overrides=["reward_scale=true"])


def test_mini_batch_must_divide_the_step():
    with pytest.raises(ConfigError, match=r"train.mini_batch_size=3: must divide rollout_batch_size \* "
                                          r"num_return_sequences_in_group = 512 \* 8 = 4096"):
        load_config(overrides=["train.mini_batch_size=3", "train.micro_batch_size=1"])


def test_mini_batch_splits_into_dp_shares():
    base = ["rollout_batch_size=12", "num_return_sequences_in_group=2", "train.mini_batch_size=12"]
    load_config(overrides=base + ["train.micro_batch_size=3"], world_size=2)  # 12/2 = 6 = 2 x 3
    load_config(overrides=base + ["train.micro_batch_size=4"], world_size=2)  # micro-batches of 4 and 2
    with pytest.raises(ConfigError, match=r"train.mini_batch_size=12: must be divisible by the data-parallel "
                                          r"size dp=8"):
        load_config(overrides=base + ["train.micro_batch_size=1", "rollout_batch_size=16"], world_size=8)


def test_rollout_batch_must_split_over_dp():
    with pytest.raises(ConfigError, match=r"rollout_batch_size=3: must be divisible by the data-parallel size dp=2"):
        load_config(overrides=["rollout_batch_size=3", "train.mini_batch_size=4", "train.micro_batch_size=1"],
                    world_size=2)


def test_model_parallel_product_must_divide_world_size():
    msg = problems(["parallel.tp=2", "parallel.pp=2"], world_size=6)
    assert "tp(2) * pp(2) * cp(1) = 4 does not divide WORLD_SIZE(6)" in msg
    # with the product dividing the world size, dp is derived and the batch rules use it
    load_config(overrides=["parallel.tp=2", "parallel.pp=2"], world_size=8)


def test_layout_must_fit_the_model_shape():
    msg = problems(["parallel.tp=4"], world_size=4)  # 2 query groups cannot split over 4 ranks
    assert "parallel.tp=4: must divide model.num_query_groups (2)" in msg
    msg = problems(["parallel.pp=4", "model.num_layers=6"], world_size=4)
    assert "parallel.pp=4: must divide model.num_layers (6)" in msg
    msg = problems(["model.num_attention_heads=6", "model.num_query_groups=4"])
    assert "model.num_query_groups=4: must divide model.num_attention_heads (6)" in msg
    # shapes from a Hugging Face directory are checked when the model is built, not here
    load_config(overrides=["model.hf_path=/nonexistent", "parallel.tp=4"], world_size=4)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=true: needs parallel.tp >= 2 \(got 1\)"):
        load_config(overrides=["parallel.sequence_parallel=true"])
    load_config(overrides=["parallel.sequence_parallel=true", "parallel.tp=2"], world_size=2)


def test_token_bound_must_hold_one_sequence():
    with pytest.raises(ConfigError, match=r"train.max_tokens_per_micro_batch=100: must hold one whole sequence "
                                          r"of prompt_length \+ response_length = 6144 tokens"):
        load_config(overrides=["train.max_tokens_per_micro_batch=100"])


def test_disaggregated_needs_server_urls():
    with pytest.raises(ConfigError, match=r"rollout.mode=disaggregated needs the URLs"):
        load_config(overrides=["rollout.mode=disaggregated", "rollout.engine=sglang"])
    load_config(overrides=["rollout.mode=disaggregated", "rollout.server_urls=[http://h:30000]"])


def test_all_problems_are_reported_together():
    msg = problems(["gamma=2", "pg_clip=-1", "reward_norm=x"])
    assert msg.startswith("3 configuration problems")
    assert "gamma=2.0" in msg and "pg_clip=-1.0" in msg and "reward_norm=x" in msg


@pytest.mark.parametrize("bad, good", [
    ("reward_nrom", "reward_norm"),
    ("lr", "train.lr"),
    ("train.lr_rate", "train.lr"),
    ("parallel.tensor_parallel", "parallel.tp"),
    ("tensor_model_parallel_size", "parallel.tp"),
    ("learning_rate", "train.lr"),
    ("model.num_layer", "model.num_layers"),
    ("rollout.temprature", "rollout.temperature"),
])
def test_unknown_key_names_the_nearest_valid_one(bad, good):
    assert suggest_key(bad) == good
    with pytest.raises(ConfigError, match=rf"{re.escape(bad)}: unknown configuration key \(on the command line\)\. "
                                          rf"Did you mean `{re.escape(good)}`\?"):
        load_config(overrides=[f"{bad}=1"])


def test_dp_is_derived_never_configured():
    with pytest.raises(ConfigError, match=r"parallel.dp: dp is not configured; it is derived as WORLD_SIZE"):
        load_config(overrides=["parallel.dp=2"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("reward_norm: group\ntrain:\n  micro_batchsize: 2\n")
    with pytest.raises(ConfigError, match=rf"train.micro_batchsize: unknown configuration key \(in "
                                          rf"{re.escape(str(path))}\)\. Did you mean `train.micro_batch_size`\?"):
        load_config(str(path))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr \(command line\): 'fast' is not a number"):
        load_config(overrides=["train.lr=fast"])
    path = tmp_path / "t.yaml"
    path.write_text("parallel:\n  tp: two\n")
    with pytest.raises(ConfigError, match=rf"parallel.tp \({re.escape(str(path))}\)"):
        load_config(str(path))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ntrain:\n  lr: [1e-6\n  micro_batch_size: 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:\d+:\d+: YAML syntax error"):
        load_config(str(path))


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match=r"no_such\.yaml: no such file"):
        load_config(str(tmp_path / "no_such.yaml"))
    with pytest.raises(ConfigError, match=r"override `seed`: must be key.path=value"):
        load_config(overrides=["seed"])
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"the top level must be a mapping"):
        load_config(str(path))


def test_readme_configuration_table_is_current():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = config_table()
    assert table in readme, "README.md's configuration table is stale: paste `python tools/config_table.py`"
    for key in list(PUBLISHED_DEFAULTS) + list(ADDED_DEFAULTS):
        assert f"| `{key}` |" in table


def test_distributed_optimizer_needs_adam():
    with pytest.raises(ConfigError, match=r"train.use_distributed_optimizer=true: works with train.optimizer adam "
                                          r"or adamw only .* Set train.optimizer: adamw"):
        load_config(overrides=["train.optimizer=sgd", "train.use_distributed_optimizer=true"])
    load_config(overrides=["train.optimizer=adamw", "train.use_distributed_optimizer=true"])


@pytest.mark.parametrize("override, message", [
    ("rollout_batch_size=abc", "rollout_batch_size (command line): 'abc' is not an integer. Give rollout_batch_size "
                               "an integer"),
    ("train.lr=fast", "train.lr (command line): 'fast' is not a number."),
    ("eval.enabled=maybe", "eval.enabled (command line): 'maybe' is not true or false."),
    ("checkpoint.num_to_keep=z", "checkpoint.num_to_keep (command line): 'z' is not null or an integer."),
])
def test_a_type_error_names_the_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_the_semantics_document_names_every_root_key_and_the_code_cites_it():
    with open(os.path.join(REPO, "docs", "semantics.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [fd.name for fd in dataclasses.fields(LitePPOConfig)
               if fd.name not in SECTIONS and f"`{fd.name}" not in text]
    assert not missing, f"docs/semantics.md does not name {missing}"
    for module in ("update/loss.py", "update/updater.py", "trainer/loop.py"):
        with open(os.path.join(REPO, "liteppo_mcore", module), encoding="utf-8") as f:
            assert "docs/semantics.md" in f.read(), module
