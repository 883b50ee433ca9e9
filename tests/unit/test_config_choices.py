"""`config.choices` is the one list of allowed values: torch-free, complete, and what validation, the schema's
docstrings, the algo functions and the rollout engines all use."""

import ast
import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
import torch

from liteppo_mcore.config import ConfigError, LitePPOConfig, choices, load_config, valid_key_paths
from liteppo_mcore.config.docs import field_docs
from liteppo_mcore.config.validate import fmt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "examples", "tiny_cpu.yaml")
BOGUS = "not-a-choice"


def _problems(overrides):
    """The validation problems of tiny_cpu.yaml with `overrides` (one process); [] when it validates."""
    try:
        load_config(TINY, overrides, world_size=1)
    except ConfigError as err:
        return err.problems
    return []


def _string_leaves(cls=LitePPOConfig, prefix=""):
    """(key path, field docstring) of every str or Optional[str] leaf key of the schema."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _string_leaves(tp, prefix + f.name + ".")
        elif tp in (str, str | None):
            yield prefix + f.name, docs.get(f.name, "")


def test_choices_is_stdlib_only_and_imports_without_torch():
    tree = ast.parse(open(choices.__file__, encoding="utf-8").read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing"}, imported
    code = ("import sys\n"
            "for name in ('torch', 'megatron', 'megatron.core'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            "from liteppo_mcore.config import choices\n"
            "assert choices.ADV_ESTIMATORS and choices.CHOICES_BY_KEY\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_key_with_fixed_values_is_in_choices():
    """A string key whose validation says "must be one of" takes a fixed set: it must be listed in choices."""
    assert set(choices.CHOICES_BY_KEY) <= set(valid_key_paths())
    enum_keys = {key for key, _ in _string_leaves()
                 if any(p.startswith(f"{key}={BOGUS}: must be one of") for p in _problems([f"{key}={BOGUS}"]))}
    assert enum_keys == set(choices.CHOICES_BY_KEY)


@pytest.mark.parametrize("key", sorted(choices.CHOICES_BY_KEY))
def test_validation_rejects_values_outside_and_accepts_every_value_inside(key):
    allowed = choices.CHOICES_BY_KEY[key]
    assert len(set(allowed)) == len(allowed) and all(v is None or isinstance(v, str) for v in allowed)
    expected = f"{key}={BOGUS}: must be one of {', '.join(fmt(v) for v in allowed)}. Set {key} to one of them."
    assert expected in _problems([f"{key}={BOGUS}"])
    for value in allowed:
        # A valid value may still break another rule (e.g. grpo needs reward_norm=group): only the list matters.
        problems = _problems([f"{key}={fmt(value)}"])
        about_allowed = [p for p in problems if p.startswith(f"{key}=") and "must be one of" in p]
        assert about_allowed == [], (value, about_allowed)


@pytest.mark.parametrize("key", sorted(choices.CHOICES_BY_KEY))
def test_the_schema_docstring_names_every_allowed_value(key):
    """The README's configuration table (built from these docstrings) must not fall behind choices."""
    doc = dict(_string_leaves())[key]
    missing = [fmt(v) for v in choices.CHOICES_BY_KEY[key]
               if not re.search(rf"(?<![\w-]){re.escape(fmt(v))}(?![\w-])", doc)]
    assert missing == [], f"{key}'s docstring {doc!r} does not name {missing}"


def test_auto_keys_are_auto_plus_their_explicit_values():
    for full, explicit in ((choices.DTYPES, choices.EXPLICIT_DTYPES),
                           (choices.ATTENTION_BACKENDS, choices.EXPLICIT_ATTENTION_BACKENDS),
                           (choices.PARALLEL_BACKENDS, choices.EXPLICIT_PARALLEL_BACKENDS),
                           (choices.ROLLOUT_ENGINES, choices.EXPLICIT_ROLLOUT_ENGINES),
                           (choices.DATA_FORMATS, choices.EXPLICIT_DATA_FORMATS)):
        assert full == (choices.AUTO,) + explicit


def test_algo_uses_the_choices():
    from liteppo_mcore import algo
    from liteppo_mcore.algo import advantages

    assert algo.ADV_ESTIMATORS is choices.ADV_ESTIMATORS
    assert algo.REWARD_NORMS is choices.REWARD_NORMS
    assert algo.AGG_MODES is choices.LOSS_AGG_MODES
    assert algo.KL_KINDS is choices.KL_ESTIMATORS
    assert set(advantages.NEEDED_INPUTS) == set(choices.ADV_ESTIMATORS)


def test_every_allowed_value_runs_in_the_algo_functions():
    from liteppo_mcore import algo

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64)
    scores = torch.randn(4, generator=g, dtype=torch.float64)
    for kind in choices.KL_ESTIMATORS:
        assert torch.isfinite(algo.kl_estimate(x, x.flip(0), kind)).all(), kind
    for kind in set(choices.KL_PENALTIES) - set(choices.KL_ESTIMATORS):  # full: from the logits, not here
        with pytest.raises(ValueError, match=rf"unknown KL estimator kind='{kind}'.*computed from the logits"):
            algo.kl_estimate(x, x, kind)
    for mode in choices.LOSS_AGG_MODES:
        share = algo.aggregate(x, mask, mode=mode, num_tokens=int(mask.sum()), num_seqs=4, response_length=4)
        assert torch.isfinite(share), mode
    for norm in choices.REWARD_NORMS:
        running = algo.RunningMoments() if norm == "running" else None
        out = algo.normalize_rewards(scores, group_size=2, reward_norm=norm, running=running)
        assert out.shape == scores.shape, norm
    for estimator in choices.ADV_ESTIMATORS:
        adv, ret = algo.compute_advantages(estimator, mask, token_rewards=x, values=x, normalized_scores=scores,
                                           group_size=2)
        assert adv.shape == ret.shape == mask.shape, estimator
    with pytest.raises(ValueError, match=re.escape("valid: 'group', 'batch', 'running', None")):
        algo.normalize_rewards(scores, group_size=2, reward_norm="median")


def test_rollout_uses_the_choices(monkeypatch):
    from liteppo_mcore import rollout
    from liteppo_mcore.rollout import fast_decoder

    assert rollout.ENGINES is choices.EXPLICIT_ROLLOUT_ENGINES
    assert fast_decoder.SUPPORTED_FAMILIES is choices.MODEL_FAMILIES
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in choices.ROLLOUT_ENGINES:
        assert rollout.resolve_engine_name(name) in choices.EXPLICIT_ROLLOUT_ENGINES, name
    with pytest.raises(rollout.RolloutEngineError,
                       match=re.escape(f"Choose one of {', '.join(choices.ROLLOUT_ENGINES)}.")):
        rollout.resolve_engine_name("vllm")


def test_spoken_lists_values_as_the_messages_do():
    assert choices.spoken(("jsonl",)) == "jsonl"
    assert choices.spoken(("jsonl", "parquet")) == "jsonl or parquet"
    assert choices.spoken(choices.DATA_FORMATS) == "auto, jsonl or parquet"


def _import_tool(name):
    """tools/`name`.py as a module (the tools are scripts, not a package)."""
    import importlib

    tools = os.path.join(REPO, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return importlib.import_module(name)


def test_the_family_tables_have_one_entry_per_family():
    from liteppo_mcore.models import shapes
    from liteppo_mcore.rollout import hf_engine

    assert set(hf_engine.ARCHITECTURES) == set(choices.MODEL_FAMILIES)
    assert sorted(shapes.HF_ARCHITECTURES.values()) == sorted(choices.MODEL_FAMILIES)  # one class per family
    assert {arch: family for family, arch in hf_engine.ARCHITECTURES.items()} == shapes.HF_ARCHITECTURES


def test_the_dtype_tables_have_one_entry_per_explicit_dtype():
    from liteppo_mcore.checkpoint import conversion
    from liteppo_mcore.models import gpt

    bench_logprob = _import_tool("bench_logprob")
    for table in (gpt._DTYPES, conversion.DTYPES, bench_logprob.DTYPES):
        assert set(table) == set(choices.EXPLICIT_DTYPES), table
    assert gpt._DTYPES == conversion.DTYPES == bench_logprob.DTYPES
    assert {dtype: name for name, dtype in conversion.DTYPES.items()} == conversion._CFG_DTYPE
    for name in choices.EXPLICIT_DTYPES:
        assert gpt.resolve_dtype(name) is conversion._dtype(name, {}) is conversion.DTYPES[name]
    with pytest.raises(conversion.ConversionError) as err:
        conversion._dtype("fp8", {})
    assert str(err.value) == "dtype 'fp8': expected auto (the config's), bf16, fp16 or fp32."


def test_the_data_readers_take_the_formats():
    from liteppo_mcore.data import DataError, detect_format
    from liteppo_mcore.data.readers import FORMAT_BY_EXTENSION

    assert set(FORMAT_BY_EXTENSION.values()) == set(choices.EXPLICIT_DATA_FORMATS)
    for name in choices.EXPLICIT_DATA_FORMATS:
        assert detect_format("prompts.txt", name) == name
    assert detect_format("prompts.parquet", choices.AUTO) == "parquet"
    with pytest.raises(DataError) as err:
        detect_format("prompts.jsonl", "csv")
    assert str(err.value) == "data.format='csv' is not a known format. Set data.format: auto, jsonl or parquet."
    with pytest.raises(DataError) as err:
        detect_format("prompts.txt")
    assert str(err.value).endswith("Set data.format: jsonl or parquet.")


@pytest.mark.parametrize("tool, option, allowed", [
    ("convert_hf_to_mcore", "--dtype", choices.DTYPES),
    ("convert_mcore_to_hf", "--dtype", choices.DTYPES),
    ("bench_logprob", "--dtype", choices.EXPLICIT_DTYPES),
    ("bench_train_step", "--attention-backend", choices.EXPLICIT_ATTENTION_BACKENDS),
])
def test_the_tools_offer_the_choices(tool, option, allowed, capsys):
    """The option's --help line lists exactly the allowed values, in their order."""
    with pytest.raises(SystemExit) as done:
        _import_tool(tool).parse_args(["--help"])
    assert done.value.code == 0
    assert f"{option} {{{','.join(allowed)}}}" in capsys.readouterr().out


def test_the_deliberate_subsets_stay_inside_the_choices():
    """The benchmarks' --dtype and the GPU tests' dtypes and engines are subsets on purpose; the GPU
    tests' attention backends are all of them (te where Transformer Engine imports)."""
    import argparse

    from liteppo_mcore.utils.bench import add_common_args
    from tests.gpu import helpers as H

    parser = argparse.ArgumentParser()
    add_common_args(parser, {"small": {}})
    (dtype,) = [action for action in parser._actions if "--dtype" in action.option_strings]
    assert set(dtype.choices) < set(choices.EXPLICIT_DTYPES)
    assert set(H.dtypes()) < set(choices.EXPLICIT_DTYPES)
    assert set(H.ENGINES) < set(choices.EXPLICIT_ROLLOUT_ENGINES)
    backends = H.attention_backends()
    assert backends == [b for b in choices.EXPLICIT_ATTENTION_BACKENDS if b in backends]
    assert set(choices.EXPLICIT_ATTENTION_BACKENDS) - set(backends) <= {"te"}
