"""`SGLangEngine`: the rollout engine protocol on top of SGLang servers (see `build.py` for placement).

Every rank calls every method (the collective contract of `liteppo_mcore.rollout.engine`). In
`generate`, each member of a model replica sends its contiguous share of the replica's prompts to its
own server; errors are agreed on by all ranks (so none waits forever), then the shares are gathered
over the replica so that its ranks return identical results.

Memory, colocated (the servers share the training GPUs): `sleep` releases what training needs, the
KV cache and the weights. The weights come back first, are re-pushed (released weight memory holds
garbage unless the server runs with --enable-weights-cpu-backup), and only then does the KV cache
come back: weights -> push -> KV cache, so the KV pool is never allocated while the trainer's state is
still resident (CUDA graphs are never released). Generating on weights that were released and not pushed again is
refused: the engine tracks it, so a rollout on stale weights cannot happen.

Weight versions: every push carries the trainer's `weight_version` (its step), and every /generate
answer's `meta_info.weight_version` must be the version last pushed; a mismatch is an error naming both:
the end-to-end guard that the rollout used the weights just trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..engine import Generation, RolloutEngine, SamplingParams, WeightBucket
from .client import ServerClient, SGLangServerError
from .placement import share_bounds
from .protocol import check_weight_versions, generate_payload, parse_generate_response
from .version import TAG_KV_CACHE, TAG_WEIGHTS

ReplicaGather = Callable[[Any], list[Any]]  # one object per replica member, in member order


class SGLangEngine(RolloutEngine):
    """Generation through SGLang's HTTP API; weights pushed by a `TensorSyncer`/`DistributedSyncer`."""

    name = "sglang"
    needs_weight_sync = True

    def __init__(self, *, client: ServerClient, syncer: Any, ops: Any, member: int, members: int,
                 gather_replica: ReplicaGather, admin_clients: Sequence[ServerClient] = (),
                 stream: int = 0, eos_token_ids: Sequence[int] = (), manages_memory: bool = True,
                 owned: Sequence[Any] = (), on_shutdown: Callable[[], None] | None = None):
        self.client = client                      # the server this rank generates on
        self.syncer = syncer
        self.ops = ops
        self.member, self.members = member, members
        self.gather_replica = gather_replica
        self.admin_clients = list(admin_clients)  # servers this rank pauses/sleeps (leader/source)
        self.stream = stream                      # separates the seeds of DP ranks
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.manages_memory = manages_memory      # colocated: release memory while training
        self.owned = list(owned)                  # server processes this rank launched
        self.on_shutdown = on_shutdown
        self.released: set = set()                # memory tags released on the servers
        self.weights_pushed = True                # False from a weights release until the next push
        self.weight_version: str | None = None  # of the last push; every answer must report it
        self._closed = False

    @property
    def asleep(self) -> bool:
        return bool(self.released)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """See `RolloutEngine.generate`. Each rank's share is one /generate request whose answer holds all
        its responses, so `on_progress` is never called."""
        if not self.weights_pushed:
            raise SGLangServerError("generate on SGLang servers whose weights were released and not pushed "
                                    "again: released weight memory holds garbage. Call update_weights after "
                                    "sleep (the trainer does, every step).")
        if self.asleep:
            self.wake()
        if not params.stop_token_ids and self.eos_token_ids:
            params = dataclasses.replace(params, stop_token_ids=self.eos_token_ids)
        start, end = share_bounds(len(prompts), self.member, self.members)
        mine: list[list[Generation]] = []
        error = None
        if end > start:
            try:
                payload = generate_payload(prompts[start:end], params, stream=self.stream,
                                           first_prompt_index=start)
                answer = self.client.request("/generate", payload)
                check_weight_versions(answer, self.weight_version, self.client.describe())
                mine = parse_generate_response(answer, end - start, params)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                error = f"{type(exc).__name__}: {exc}"
        error = self.ops.agree(error)
        if error:
            raise SGLangServerError(f"SGLang generation failed: {error}")
        shares = self.gather_replica(mine)
        results = [group for share in shares for group in share]
        if len(results) != len(prompts):
            raise SGLangServerError(f"gathered {len(results)} results for {len(prompts)} prompts; the ranks "
                                    "of a replica must pass identical prompts")
        return results

    # -- weights and memory ----------------------------------------------------------------------
    def update_weights(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        """Weights back (if released), push, then the KV cache back (module doc)."""
        self._resume([TAG_WEIGHTS])
        self.syncer.sync(buckets, weight_version)
        self.weights_pushed = True
        self.weight_version = weight_version
        self.wake()

    def _admin(self, path: str, payload: Any) -> None:
        error = None
        try:
            for client in self.admin_clients:
                client.request(path, payload)
        except Exception as exc:  # noqa: BLE001 - shared with every rank below
            error = f"{type(exc).__name__}: {exc}"
        error = self.ops.agree(error)
        if error:
            raise SGLangServerError(f"SGLang {path} failed: {error}")

    def sleep(self) -> None:
        """Colocated: release what training needs, the KV cache and the weights (needs
        --enable-memory-saver). CUDA graphs stay; their memory is small next to those two."""
        if not self.manages_memory:
            return
        tags = [tag for tag in (TAG_KV_CACHE, TAG_WEIGHTS) if tag not in self.released]
        if tags:
            self._admin("/release_memory_occupation", {"tags": tags})
            self.released.update(tags)
            if TAG_WEIGHTS in tags:
                self.weights_pushed = False

    def wake(self) -> None:
        """Take memory back in the safe order: released weights first (they still need a push, see
        update_weights); the KV cache only once the weights are pushed."""
        self._resume([TAG_WEIGHTS])
        if self.weights_pushed:
            self._resume([TAG_KV_CACHE])

    def _resume(self, tags: Sequence[str]) -> None:
        wanted = [tag for tag in tags if tag in self.released]
        if wanted:
            self._admin("/resume_memory_occupation", {"tags": wanted})
            self.released.difference_update(wanted)

    def shutdown(self) -> None:
        """Stop the servers this rank launched (local, best effort; safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self.on_shutdown is not None:
            try:
                self.on_shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        for process in self.owned:
            process.shutdown()
