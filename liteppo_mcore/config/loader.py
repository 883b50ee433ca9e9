"""Loading: a YAML file plus `key.path=value` overrides, merged over the schema's defaults, then validated.

Unknown keys are errors that name the closest valid key; a value of the wrong type names its key;
a YAML syntax error names the file and line. Nothing here touches torch or a process group.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from liteppo_mcore.config.schema import LitePPOConfig
from liteppo_mcore.config.validate import ConfigError, validate

# `Optional[X]` and `X | None` (how the schema writes it) have different origins
_UNION_ORIGINS = (typing.Union, types.UnionType)

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_free_mapping(tp: Any) -> bool:
    """Dict-typed fields (e.g. model.rope_scaling) take any keys below them."""
    origin = typing.get_origin(tp)
    if origin in _UNION_ORIGINS:
        return any(_is_free_mapping(a) for a in typing.get_args(tp))
    return origin is dict or tp is dict


def valid_key_paths(cls: type = LitePPOConfig, prefix: str = "") -> list[str]:
    """Every key path of the schema, sections included, e.g. `model`, `model.family`."""
    paths = []
    for name, tp in _field_types(cls).items():
        path = prefix + name
        paths.append(path)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            paths.extend(valid_key_paths(tp, path + "."))
    return paths


# Names users bring from megatron and other trainers, mapped to ours (leaf names).
_ALIASES = {
    "tensor_model_parallel_size": "tp", "tensor_parallel_size": "tp", "tensor_parallel": "tp",
    "pipeline_model_parallel_size": "pp", "pipeline_parallel_size": "pp", "pipeline_parallel": "pp",
    "context_parallel_size": "cp", "context_parallel": "cp", "learning_rate": "lr",
    "n_samples_per_prompt": "num_return_sequences_in_group", "group_size": "num_return_sequences_in_group",
}
_DERIVED = {"dp", "data_parallel_size", "dp_size"}


def suggest_key(bad_path: str, valid: Sequence[str] | None = None) -> str | None:
    """The valid key path closest to `bad_path`: aliases first, then by whole path, then by the last name."""
    valid = list(valid) if valid is not None else valid_key_paths()
    alias = _ALIASES.get(bad_path.rsplit(".", 1)[-1])
    if alias is not None:
        return next(p for p in valid if p.rsplit(".", 1)[-1] == alias)
    hit = difflib.get_close_matches(bad_path, valid, n=1, cutoff=0.6)
    if hit:
        return hit[0]
    leaf = bad_path.rsplit(".", 1)[-1]
    by_leaf: dict[str, str] = {}
    for path in valid:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], path)
    hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[hit[0]] if hit else None


def find_unknown_keys(tree: dict[str, Any], cls: type = LitePPOConfig, prefix: str = "") -> list[str]:
    """Key paths in a nested dict that the schema does not have."""
    types = _field_types(cls)
    unknown = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in types:
            unknown.append(path)
            continue
        tp = types[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                unknown.extend(find_unknown_keys(value, tp, path + "."))
        elif _is_free_mapping(tp):
            continue
    return unknown


def _unknown_key_messages(tree: dict[str, Any], where: str) -> list[str]:
    messages = []
    for path in find_unknown_keys(tree):
        if path.rsplit(".", 1)[-1] in _DERIVED:
            messages.append(f"{path}: dp is not configured; it is derived as WORLD_SIZE / (parallel.tp * "
                            "parallel.pp * parallel.cp). Remove the key and launch as many processes as you want.")
            continue
        hint = suggest_key(path)
        fix = f"Did you mean `{hint}`?" if hint else "See the configuration table in README.md."
        messages.append(f"{path}: unknown configuration key ({where}). {fix}")
    return messages


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError([f"--config {path}: no such file. Pass the path of a YAML file, e.g. examples/liteppo.yaml."])
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}: YAML syntax error: {problem}. Fix the file at that line."]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Save the file as UTF-8."]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}. "
                           "Write `key: value` lines, as in examples/liteppo.yaml."])
    return data


def _parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    problems = []
    good = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key != key.strip():
            problems.append(f"override `{item}`: must be key.path=value. Write e.g. `train.lr=1e-6`.")
        else:
            good.append(item)
    if problems:
        raise ConfigError(problems)
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(good), resolve=False)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError([f"overrides {good}: {e}. Write each as key.path=value."]) from None


def _typed_merge(layers: Sequence[tuple[str, dict[str, Any]]]) -> LitePPOConfig:
    merged: DictConfig = OmegaConf.structured(LitePPOConfig)
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)  # type: ignore[assignment]
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = (getattr(e, "msg", None) or str(e)).split("\n")[0]
            expected = expected_type(key)
            if expected is None:
                raise ConfigError([f"{key} ({where}): {msg}."]) from None
            value = _lookup(layer, key)
            raise ConfigError([f"{key} ({where}): {value!r} is not {expected}. Give {key} {expected} "
                               f"(README.md's configuration table lists every key)."]) from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}"]) from None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def expected_type(dotted: str) -> str | None:
    """What a schema key takes, in words ("an integer", "null or a number", ...); None when unknown."""
    cls: Any = LitePPOConfig
    hint: Any = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None
        cls = hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in _UNION_ORIGINS and len(args) < len(typing.get_args(hint))
    base = args[0] if optional and len(args) == 1 else hint
    word = _TYPE_WORDS.get(base)
    if word is None:
        origin = typing.get_origin(base)
        word = {list: "a list", dict: "a mapping"}.get(origin)
    if word is None:
        return None
    return f"null or {word}" if optional else word


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def world_size_from_env() -> int:
    """The job's world size as torchrun (or SLURM through torchrun) sets it; 1 for plain python."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def load_config(config_path: str | None = None, overrides: Sequence[str] = (),
                world_size: int | None = None, check: bool = True, *, any_world_size: bool = False) -> LitePPOConfig:
    """Build the configuration: schema defaults <- YAML file <- overrides; then validate for `world_size`
    (default: the environment's). `any_world_size`: validate for the smallest job the layout fits
    (tp * pp * cp processes, one data-parallel rank), e.g. to print a recipe's configuration anywhere.

    Raises ConfigError (a ValueError) whose message lists every problem with its fix.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    if config_path is not None:
        tree = _read_yaml(config_path)
        problems += _unknown_key_messages(tree, f"in {config_path}")
        layers.append((config_path, tree))
    if overrides:
        tree = _parse_overrides(overrides)
        problems += _unknown_key_messages(tree, "on the command line")
        layers.append(("command line", tree))
    if problems:
        raise ConfigError(problems)
    cfg = _typed_merge(layers)
    if check:
        if any_world_size:
            p = cfg.parallel
            sizes = [v for v in (p.tp, p.pp, p.cp) if isinstance(v, int) and v > 0]
            world_size = sizes[0] * sizes[1] * sizes[2] if len(sizes) == 3 else 1
        validate(cfg, world_size if world_size is not None else world_size_from_env())
    return cfg


def to_yaml(cfg: LitePPOConfig) -> str:
    """The resolved configuration as YAML (what --print-config prints and a run directory stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: LitePPOConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
