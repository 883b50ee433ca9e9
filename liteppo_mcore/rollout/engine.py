"""The rollout engine protocol: what the trainer asks of any engine (mcore, hf, sglang).

Collective contract: every rank of the job calls `generate`, `update_weights`, `sleep`, `wake` and
`shutdown` in the same order. Each rank passes its DP share of prompts (the ranks of one model
replica, i.e. its TP/PP/CP ranks, pass identical prompts) and every rank of a replica gets identical
results back. `update_weights` receives the weight exporter's buckets on every rank; which ranks feed
the engine is the engine's business.

Log-probs are those of liteppo-semantics: of the sampled token under `softmax(logits / temperature)`
over the FULL vocabulary (top-p/top-k shape sampling only, never renormalize the log-probs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import Tensor

FINISH_REASONS = ("stop", "length")

WeightBucket = List[Tuple[str, Tensor]]  # (Hugging Face name, full tensor) pairs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: disabled
    max_new_tokens: int = 16        # = response_length
    n: int = 1                      # samples per prompt
    seed: int = 0                   # sampling is reproducible for a fixed layout and seed
    greedy: bool = False            # argmax decoding (evaluation); log-probs still at `temperature`
    stop_token_ids: Tuple[int, ...] = field(default_factory=tuple)  # EOS ids; the stop token is kept


@dataclass
class Generation:
    """One sampled response: its tokens (the stop token included when produced), per-token log-probs
    (same length) and why it ended ("stop": a stop token; "length": max_new_tokens reached)."""

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str


class RolloutEngine(ABC):
    """Base class of the engines; see the module docstring for the collective contract."""

    name: str = "abstract"
    #: True when the engine holds its own copy of the weights and needs `update_weights` after updates.
    needs_weight_sync: bool = True
    #: Set by the trainer for its progress bar: called with the number of responses just finished.
    on_progress: Optional[Callable[[int], None]] = None

    def _advance(self, num_responses: int) -> None:
        if self.on_progress is not None:
            self.on_progress(num_responses)

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Generation]]:
        """For each prompt (token ids), `params.n` generations."""

    @abstractmethod
    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: Optional[str] = None) -> None:
        """Load the trainer's current weights, streamed bucket by bucket (consume each before the next).
        `weight_version` (the trainer's step) names them; engines that serve from elsewhere check it."""

    def sleep(self) -> None:
        """Release accelerator memory (weights / KV cache) while the trainer trains. No-op by default."""

    def wake(self) -> None:
        """Take the memory back before the next `generate`. No-op by default."""

    def shutdown(self) -> None:
        """Stop servers / free everything. Safe to call twice."""


def copy_weight_stream(buckets: Iterable[WeightBucket], params: Optional[Dict[str, Tensor]], *, engine: str,
                       family: str, skip: Optional[Callable[[str], bool]] = None) -> None:
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


def _copy_bucket(bucket: WeightBucket, params: Dict[str, Tensor], seen: set, engine: str, family: str,
                 skip: Optional[Callable[[str], bool]]) -> None:
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
