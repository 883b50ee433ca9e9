"""The rollout engine protocol: what the trainer asks of any engine (mcore, hf, sglang).

Collective contract: every rank of the job calls `generate`, `update_weights`, `sleep`, `wake` and
`shutdown` in the same order. Each rank passes its DP share of prompts (the ranks of one model
replica, i.e. its TP/PP/CP ranks, pass identical prompts) and every rank of a replica gets identical
results back. `update_weights` receives the weight exporter's buckets on every rank; which ranks feed
the engine is the engine's business.

Log-probs are those of docs/semantics.md: of the sampled token under `softmax(logits / temperature)`
over the FULL vocabulary (top-p/top-k shape sampling only, never renormalize the log-probs).

Besides the protocol, the rules every engine shares: the sampling-parameter check (`check_params`),
the per-replica sampling seed (`sampling_seed`), cutting a decoded row at its stop token (`finish`),
handing the replica's first rank's results to its other ranks (`share_within_replica`), and copying a
weight stream into an engine's tensors (`copy_weight_stream`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor

from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.utils.seeds import mix_seed

FINISH_REASONS = ("stop", "length")

WeightBucket = list[tuple[str, Tensor]]  # (Hugging Face name, full tensor) pairs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: disabled
    max_new_tokens: int = 16        # = response_length
    n: int = 1                      # samples per prompt
    seed: int = 0                   # sampling is reproducible for a fixed layout and seed
    greedy: bool = False            # argmax decoding (evaluation); log-probs still at `temperature`
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # EOS ids; the stop token is kept


@dataclass
class Generation:
    """One sampled response: its tokens (the stop token included when produced), per-token log-probs
    (same length) and why it ended ("stop": a stop token; "length": max_new_tokens reached)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class RolloutEngine(ABC):
    """Base class of the engines; see the module docstring for the collective contract."""

    name: str = "abstract"
    #: True when the engine holds its own copy of the weights and needs `update_weights` after updates.
    needs_weight_sync: bool = True

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """For each prompt (token ids), `params.n` generations.

        `on_progress` (the trainer's progress bar) is called with the number of this rank's responses
        just finished, as they finish; engines that produce all responses at once may never call it, so
        a caller completes its count itself after `generate` returns."""

    @abstractmethod
    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        """Load the trainer's current weights, streamed bucket by bucket (consume each before the next).
        `weight_version` (the trainer's step) names them; engines that serve from elsewhere check it."""

    def sleep(self) -> None:  # noqa: B027 (a no-op default, not abstract: in-process engines keep their memory)
        """Release accelerator memory (weights / KV cache) while the trainer trains. No-op by default."""

    def wake(self) -> None:  # noqa: B027 (a no-op default, as sleep)
        """Take the memory back before the next `generate`. No-op by default."""

    def shutdown(self) -> None:  # noqa: B027 (a no-op default: nothing to stop for in-process engines)
        """Stop servers / free everything. Safe to call twice."""


def check_params(params: SamplingParams) -> None:
    """Raise a ValueError naming every sampling parameter no engine can honour (temperature <= 0, top_p
    outside (0, 1], top_k 0 or below -1, max_new_tokens or n below 1). Engines call it first in `generate`."""
    problems = []
    if not params.temperature > 0:
        problems.append(f"temperature must be > 0 (log-probs are at the temperature), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k == 0 or params.top_k < -1:
        problems.append(f"top_k must be -1 (disabled) or >= 1, got {params.top_k}")
    if params.max_new_tokens < 1 or params.n < 1:
        problems.append(f"max_new_tokens and n must be >= 1, got {params.max_new_tokens} and {params.n}")
    if problems:
        raise ValueError("sampling parameters: " + "; ".join(problems) + ". Fix the rollout section.")


def sampling_seed(seed: int, dp_rank: int) -> int:
    """The seed of DP replica `dp_rank`'s sampling generator for a call seeded `seed`: the replicas sample
    different prompts, with independent noise, and a fixed (seed, layout) samples the same again."""
    return mix_seed(seed, dp_rank)


def finish(new_tokens: Sequence[int], logprobs: Sequence[float], stop_ids: Sequence[int]) -> Generation:
    """A decoded row (tokens and their log-probs, same length) as a `Generation`: cut after its first stop
    token, which is kept ("stop"; what follows it is padding), or whole when it has none ("length")."""
    stops = set(stop_ids)
    for i, tok in enumerate(new_tokens):
        if tok in stops:
            return Generation(list(new_tokens[: i + 1]), list(logprobs[: i + 1]), "stop")
    return Generation(list(new_tokens), list(logprobs), "length")


def share_within_replica(value: Any, groups: ParallelGroups) -> Any:
    """`value` of the replica's first rank (tp = pp = cp = 0) on every rank of the replica (collective over
    the replica's CP, PP and TP groups; every rank calls it, the others with any placeholder, e.g. None).

    Three broadcasts of a picklable object, each from rank 0 of a group: over CP, then PP, then TP. Every
    rank belongs to exactly one group of each kind, so all ranks take part in each step; groups without
    the first rank of the replica pass along values that a later step overwrites."""
    for group, size in ((groups.cp_group, groups.cp_size), (groups.pp_group, groups.pp_size),
                        (groups.tp_group, groups.tp_size)):
        if size > 1:
            assert group is not None  # a group of more than one rank is never None (see ParallelGroups)
            box = [value]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
            value = box[0]
    return value


def copy_weight_stream(buckets: Iterable[WeightBucket], params: dict[str, Tensor] | None, *, engine: str,
                       family: str, skip: Callable[[str], bool] | None = None) -> None:
    """Copy a weight stream into `params` (HF name -> the engine's tensor, None on ranks that hold no
    copy: they still iterate, since producing the buckets is collective). Every tensor must arrive, each
    once, with its shape; `skip(name)` names streamed tensors the engine has no use for."""
    seen: set = set()
    for bucket in buckets:
        if params is not None:
            _copy_bucket(bucket, params, seen, engine, family, skip)
        del bucket  # or the loop variable keeps this bucket alive while the next one is built
    missing = sorted(set(params) - seen) if params is not None else []
    if missing:
        raise KeyError(f"{engine} engine: the weight stream lacked {len(missing)} tensors, e.g. {missing[:3]}; "
                       "the engine would generate with stale weights.")


def _copy_bucket(bucket: WeightBucket, params: dict[str, Tensor], seen: set, engine: str, family: str,
                 skip: Callable[[str], bool] | None) -> None:
    for name, tensor in bucket:
        param = params.get(name)
        if param is None:
            if skip is not None and skip(name):
                continue
            raise KeyError(f"{engine} engine: the weight stream sent {name!r}, which the {family} model does not "
                           "have. The exporter and the engine disagree on the shape.")
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(f"{engine} engine: {name} has shape {list(param.shape)}, the stream sent "
                             f"{list(tensor.shape)}.")
        param.copy_(tensor)
        seen.add(name)
