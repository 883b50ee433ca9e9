"""`SGLangEngine`: the rollout engine protocol on top of SGLang servers (see `build.py` for placement).

Every rank calls every method (the collective contract of `liteppo_mcore.rollout.engine`). In
`generate`, each member of a model replica sends its contiguous share of the replica's prompts to its
own server; errors are agreed on by all ranks (so none waits forever), then the shares are gathered
over the replica so that its ranks return identical results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, List, Optional, Sequence

from ..engine import Generation, RolloutEngine, SamplingParams, WeightBucket
from .client import ServerClient, SGLangServerError
from .placement import share_bounds
from .protocol import generate_payload, parse_generate_response

ReplicaGather = Callable[[Any], List[Any]]  # one object per replica member, in member order


class SGLangEngine(RolloutEngine):
    """Generation through SGLang's HTTP API; weights pushed by a `TensorSyncer`/`DistributedSyncer`."""

    name = "sglang"
    needs_weight_sync = True

    def __init__(self, *, client: ServerClient, syncer: Any, ops: Any, member: int, members: int,
                 gather_replica: ReplicaGather, admin_clients: Sequence[ServerClient] = (),
                 stream: int = 0, eos_token_ids: Sequence[int] = (), manages_memory: bool = True,
                 owned: Sequence[Any] = (), on_shutdown: Optional[Callable[[], None]] = None):
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
        self.asleep = False
        self._closed = False

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> List[List[Generation]]:
        if self.asleep:
            self.wake()
        if not params.stop_token_ids and self.eos_token_ids:
            params = dataclasses.replace(params, stop_token_ids=self.eos_token_ids)
        start, end = share_bounds(len(prompts), self.member, self.members)
        mine: List[List[Generation]] = []
        error = None
        if end > start:
            try:
                payload = generate_payload(prompts[start:end], params, stream=self.stream,
                                           first_prompt_index=start)
                answer = self.client.request("/generate", payload)
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
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        if self.asleep:
            self.wake()  # updating released weight memory would fault; call wake() first to plan memory
        self.syncer.sync(buckets)

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
        """Colocated: release the servers' weights and KV cache (needs --enable-memory-saver)."""
        if self.manages_memory and not self.asleep:
            self._admin("/release_memory_occupation", {"tags": None})
            self.asleep = True

    def wake(self) -> None:
        if self.manages_memory and self.asleep:
            self._admin("/resume_memory_occupation", {"tags": None})
            self.asleep = False

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
