"""Deterministic prompt order, resumable position, and each data-parallel rank's share of a batch.

The order is a stream: epoch e is a permutation of the dataset drawn from (seed, e) (or the identity
without shuffling), epochs follow each other, and step k takes the next ``batch_size`` indices, crossing
into the next epoch when one runs out. The position is (epoch, offset into that epoch's permutation),
which is all a checkpoint needs: restoring it continues the stream exactly, mid-epoch included.
The same stream is drawn on every rank; each rank then keeps its contiguous share (``shard_for_rank``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> list[int]:
    """The prompt order of one epoch: a permutation drawn from (seed, epoch) alone."""
    # Hash (seed, epoch) into the generator seed so that nearby seeds and epochs give unrelated orders.
    digest = hashlib.sha256(f"prompt-order/{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(num_prompts, generator=generator).tolist()


class PromptSampler:
    """Batches of prompt indices for consecutive steps; ``state_dict`` holds the position."""

    def __init__(self, num_prompts: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order: list[int] = []
        self._order_epoch = -1

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = epoch_permutation(self.num_prompts, self.seed, self.epoch)
            else:
                self._order = list(range(self.num_prompts))
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` prompt indices; advances the position."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(batch), self.num_prompts - self.offset)
            batch.extend(order[self.offset : self.offset + take])
            self.offset += take
            if self.offset == self.num_prompts:
                self.epoch, self.offset = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position and what it is only meaningful with (dataset size, seed, shuffling)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the dataset size, seed and shuffling must match the saved ones."""
        for key in ("num_prompts", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"the saved data position was taken with {key}={state.get(key)!r}, "
                    f"this run has {key}={getattr(self, key)!r}: the position would point into a different "
                    "prompt order. Resume with the same dataset, prompt_length, seed and data.shuffle, "
                    "or start a new run directory."
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.num_prompts:
            raise ValueError(f"invalid data position epoch={epoch}, offset={offset} for {self.num_prompts} prompts")
        self.epoch, self.offset = epoch, offset


def shard_for_rank(batch: Sequence[T], dp_rank: int, dp_size: int) -> list[T]:
    """The contiguous share of a global batch (whole prompts) that data-parallel rank ``dp_rank`` owns."""
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    if len(batch) % dp_size:
        raise ValueError(
            f"a batch of {len(batch)} prompts does not split evenly over {dp_size} data-parallel ranks. "
            "Make rollout_batch_size a multiple of the data-parallel size."
        )
    share = len(batch) // dp_size
    return list(batch[dp_rank * share : (dp_rank + 1) * share])
