"""Rollout: the engine protocol, the engines (mcore, hf, fast, sglang), the weight exporter that feeds them.

`build_engine(cfg, models, groups, eos)` picks the engine that `rollout.engine` names (auto: sglang
when it is importable and CUDA is present, else hf); `sampling_params_from_config` turns the rollout
section into the `SamplingParams` of one `generate` call. The engines themselves are imported only
when built, so that choosing one never imports another's dependencies.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from liteppo_mcore.config.choices import AUTO, ROLLOUT_ENGINES
from liteppo_mcore.config.choices import EXPLICIT_ROLLOUT_ENGINES as ENGINES
from liteppo_mcore.rollout.engine import FINISH_REASONS, Generation, RolloutEngine, SamplingParams, WeightBucket


class RolloutEngineError(RuntimeError):
    """An engine that cannot be built here, with what to do about it."""


def resolve_engine_name(requested: str) -> str:
    """auto -> sglang when the sglang package is importable and CUDA is present, else hf."""
    if requested == AUTO:
        has_sglang = importlib.util.find_spec("sglang") is not None
        return "sglang" if has_sglang and torch.cuda.is_available() else "hf"
    if requested not in ENGINES:
        raise RolloutEngineError(f"rollout.engine={requested!r} is not an engine. Choose one of "
                                 f"{', '.join(ROLLOUT_ENGINES)}.")
    return requested


def eos_token_ids(tokenizer_or_ids: Any | int | Sequence[int]) -> tuple[int, ...]:
    """EOS ids from a tokenizer (its `eos_token_id`) or from ids given directly."""
    if isinstance(tokenizer_or_ids, int):
        return (tokenizer_or_ids,)
    if isinstance(tokenizer_or_ids, (list, tuple)):
        ids = tuple(int(t) for t in tokenizer_or_ids)
    else:
        eos = getattr(tokenizer_or_ids, "eos_token_id", None)
        ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(int(t) for t in eos))
    if not ids:
        raise RolloutEngineError("no EOS token: the tokenizer defines no eos_token_id, so generation could not "
                                 "stop. Use a tokenizer with an EOS token, or pass the EOS ids.")
    return ids


def build_engine(cfg, models, groups, tokenizer_or_eos_ids: Any | int | Sequence[int], *,
                 device: Any = None) -> RolloutEngine:
    """The rollout engine `cfg.rollout.engine` names, for this rank (collective-free construction for
    mcore and hf; sglang may start servers)."""
    eos = eos_token_ids(tokenizer_or_eos_ids)
    kind = resolve_engine_name(cfg.rollout.engine)
    shape = models.shape
    if kind == "mcore":
        from liteppo_mcore.rollout.mcore_engine import MCoreEngine

        return MCoreEngine(models.actor, groups, vocab_size=shape.vocab_size, eos_token_ids=eos,
                           max_sequence_length=shape.max_position_embeddings,
                           sequence_parallel=cfg.parallel.sequence_parallel)
    # Most rows decoded at once by the in-process engines (null / absent: all of a rank's rows).
    max_batch_size = cfg.rollout.max_batch_size
    if kind == "hf":
        from liteppo_mcore.rollout.hf_engine import HFEngine

        dtype = next(models.actor.parameters()).dtype
        return HFEngine(shape, groups, eos_token_ids=eos, dtype=dtype, device=device, max_batch_size=max_batch_size)
    if kind == "fast":
        from liteppo_mcore.rollout.fast_engine import FastEngine

        # The cache is sized once for the longest prompt plus response: B_max x L.
        return FastEngine(shape, groups, eos_token_ids=eos, dtype=next(models.actor.parameters()).dtype, device=device,
                          max_batch_size=max_batch_size, keep_graphs=cfg.rollout.keep_cuda_graphs,
                          max_sequence_length=min(cfg.prompt_length + cfg.response_length,
                                                  shape.max_position_embeddings))
    try:
        from liteppo_mcore.rollout.sglang import build_sglang_engine
    except ModuleNotFoundError as err:
        if err.name not in ("liteppo_mcore.rollout.sglang", "liteppo_mcore.rollout"):
            raise
        raise RolloutEngineError("rollout.engine=sglang, but this installation has no SGLang engine module "
                                 "(liteppo_mcore.rollout.sglang). Use rollout.engine: hf or mcore, or install "
                                 "a liteppo-mcore version that ships the SGLang engine.") from err
    return build_sglang_engine(cfg, models, groups, list(eos))


def sampling_params_from_config(cfg, *, greedy: bool = False, n: int | None = None, seed: int = 0,
                                stop_token_ids: Sequence[int] = ()) -> SamplingParams:
    """The rollout section as sampling parameters: temperature, top-p, top-k, response_length new tokens,
    `num_return_sequences_in_group` samples per prompt unless `n` says otherwise. Pass a different
    `seed` per step (e.g. cfg.seed + step) so that steps draw fresh samples. Greedy keeps the temperature:
    its log-probs are still those of softmax(logits / temperature)."""
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=cfg.response_length,
                          n=cfg.num_return_sequences_in_group if n is None else int(n), seed=int(seed),
                          greedy=greedy, stop_token_ids=tuple(int(t) for t in stop_token_ids))


__all__ = [
    "ENGINES", "FINISH_REASONS", "Generation", "RolloutEngine", "RolloutEngineError", "SamplingParams",
    "WeightBucket", "build_engine", "eos_token_ids", "resolve_engine_name", "sampling_params_from_config",
]
