"""Pushing the trainer's weights into SGLang servers, bucket by bucket.

Order around every sync, on each server: pause generation -> flush the cache -> open the
weight-update session (versions that have one, see version.py) -> update, bucket by bucket -> close
the session -> continue. Pausing (mode "retract") stops the scheduler so nothing runs on half-updated
weights; flushing drops KV/prefix entries computed with the old weights. Updates are sent with
flush_cache=False, since the cache is already empty and stays so while paused, and with the trainer's
`weight_version`, which the server reports back in every generation (the engine checks it). A failure
inside the session closes it (best effort) before it is raised, so a server is never left with a
session open; generation stays paused (the weights are half-updated).

Colocated (`TensorSyncer`): every rank of a server flattens each bucket, every dtype in one flattened
tensor (SGLang's "flattened_bucket" load format; `FlattenedTensorBucket.supports_multi_dtypes` in every
supported version), serializes it (CUDA IPC handles on GPU, so no copy leaves the GPU), the handles are
gathered to the server's leader, and the leader sends one update_weights_from_tensor per bucket: entry
i of the list is what SGLang's TP rank i opens. The senders keep their buffers alive until the leader
reports the call returned.

Disaggregated (`DistributedSyncer`): the trainer's source rank (global rank 0) and every server's TP
workers form an NCCL group (init_weights_update_group); per bucket, the source posts the names, dtypes
and shapes to every server (update_weights_from_distributed, which blocks in the servers' receive) and
broadcasts the tensors in the same order.

Failures are agreed on by all trainer ranks after each step (`GroupOps.agree`), so one server's error
raises on every rank instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from torch import Tensor

from ..engine import WeightBucket
from .client import ServerClient, SGLangServerError

PAUSE_MODE = "retract"
FLUSH_RETRY_STATUSES = (400, 500, 502, 503, 504)  # /flush_cache answers 400 while requests are pending


class GroupOps(Protocol):
    """The collectives a sync needs (torch.distributed in production, trivial ones in tests)."""

    def gather_to_leader(self, obj: Any) -> list[Any] | None:
        """Gather `obj` from the ranks sharing this rank's server; the list on the leader, else None."""

    def agree(self, error: str | None) -> str | None:
        """All trainer ranks exchange their error (or None); every rank gets the first error."""


def _check_answer(answer: Any, client: ServerClient, what: str) -> None:
    if isinstance(answer, dict) and answer.get("success") is False:
        raise SGLangServerError(f"{client.describe()} failed {what}: {answer.get('message', answer)}")


def pause_and_flush(clients: Sequence[ServerClient]) -> None:
    for client in clients:
        client.request("/pause_generation", {"mode": PAUSE_MODE})
    for client in clients:
        client.request("/flush_cache", None, retry_statuses=FLUSH_RETRY_STATUSES)


def continue_generation(clients: Sequence[ServerClient]) -> None:
    for client in clients:
        client.request("/continue_generation", {})


def _session(clients: Sequence[ServerClient], path: str) -> None:
    for client in clients:
        if client.protocol.weight_update_session:
            _check_answer(client.request(path, {}, retries=0), client, path.lstrip("/"))


def begin_update(clients: Sequence[ServerClient]) -> None:
    """Open the weight-update session on every server whose version has one."""
    _session(clients, "/begin_weight_update")


def end_update(clients: Sequence[ServerClient]) -> None:
    _session(clients, "/end_weight_update")


def abandon_update(clients: Sequence[ServerClient]) -> None:
    """After a failed update: close the session (so that a retry can open one), ignoring further
    errors (the first error is the one raised). Generation stays paused: the weights are half-updated."""
    try:
        end_update(clients)
    except Exception:  # noqa: BLE001 - best effort; the original failure propagates
        pass


def update_payload(base: dict[str, Any], weight_version: str | None) -> dict[str, Any]:
    payload = dict(base, flush_cache=False)
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def dtype_name(tensor: Tensor) -> str:
    """SGLang's spelling of a dtype ("bfloat16"; it does getattr(torch, name))."""
    return str(tensor.dtype).replace("torch.", "")


def _leader_step(action: Callable[[], None], is_leader: bool) -> str | None:
    if not is_leader:
        return None
    try:
        action()
        return None
    except Exception as exc:  # noqa: BLE001 - reported to every rank through GroupOps.agree
        return f"{type(exc).__name__}: {exc}"


def _raise_agreed(ops: GroupOps, error: str | None) -> None:
    error = ops.agree(error)
    if error:
        raise SGLangServerError(f"weight sync failed: {error}")


Serializer = Callable[[WeightBucket], tuple[Any, Any]]  # dtype bucket -> (wire form, buffers to keep alive)


class TensorSyncer:
    """Colocated sync through update_weights_from_tensor (see the module docstring).

    `client` is set on the server's leader only; `serialize` turns a bucket into what entry i of
    serialized_named_tensors carries (SGLang's serializer on GPU, the CPU wire format without CUDA)."""

    def __init__(self, client: ServerClient | None, ops: GroupOps, serialize: Serializer,
                 load_format: str = "flattened_bucket"):
        self.client = client
        self.ops = ops
        self.serialize = serialize
        self.load_format = load_format

    def sync(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        leader = self.client is not None
        clients = [self.client] if self.client is not None else []

        def start() -> None:
            pause_and_flush(clients)
            begin_update(clients)

        _raise_agreed(self.ops, _leader_step(start, leader))
        try:
            for bucket in buckets:
                wire, keep_alive = self.serialize(bucket)
                gathered = self.ops.gather_to_leader(wire)
                error = _leader_step(functools.partial(self._send, gathered, weight_version), leader)
                _raise_agreed(self.ops, error)  # the server has loaded (or failed) before buffers go
                del keep_alive
            _raise_agreed(self.ops, _leader_step(lambda: end_update(clients), leader))
        except BaseException:
            abandon_update(clients)
            raise
        _raise_agreed(self.ops, _leader_step(lambda: continue_generation(clients), leader))

    def _send(self, gathered: list[Any] | None, weight_version: str | None) -> None:
        client = self.client
        assert client is not None  # sent through _leader_step: on the leader, which has the client
        payload = update_payload({"serialized_named_tensors": gathered, "load_format": self.load_format},
                                 weight_version)
        _check_answer(client.request("/update_weights_from_tensor", payload, retries=0),
                      client, "update_weights_from_tensor")


def init_weights_update_group(clients: Sequence[ServerClient], tp_sizes: Sequence[int], *, master_address: str,
                              master_port: int, group_name: str,
                              join: Callable[[str, int, int], Any]) -> Any:
    """Every server's workers and this rank (rank 0) form the NCCL group; `join(addr, port, world)`
    creates this rank's side while the servers' requests are in flight."""
    from .placement import weight_group_offsets

    offsets, world_size = weight_group_offsets(tp_sizes)
    payloads = [{"master_address": master_address, "master_port": int(master_port), "rank_offset": offset,
                 "world_size": world_size, "group_name": group_name, "backend": "nccl"} for offset in offsets]
    answers = _post_concurrently(clients, "/init_weights_update_group", payloads)
    group = join(master_address, int(master_port), world_size)
    for client, answer in zip(clients, answers.wait()):
        _check_answer(answer, client, "init_weights_update_group")
    return group


class _Concurrent:
    def __init__(self, threads: list[threading.Thread], results: list[Any]):
        self.threads, self.results = threads, results

    def wait(self, timeout_s: float | None = None) -> list[Any]:
        for thread in self.threads:
            thread.join(timeout_s)
        for result in self.results:
            if isinstance(result, BaseException):
                raise result
        return self.results


def _post_concurrently(clients: Sequence[ServerClient], path: str, payloads: Sequence[Any]) -> _Concurrent:
    """POST to every server from its own thread (the calls block until the broadcast completes)."""
    results: list[Any] = [None] * len(clients)

    def run(index: int) -> None:
        try:
            results[index] = clients[index].request(path, payloads[index], retries=0)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"sglang-post-{i}")
               for i in range(len(clients))]
    for thread in threads:
        thread.start()
    return _Concurrent(threads, results)


class DistributedSyncer:
    """Disaggregated sync through update_weights_from_distributed (see the module docstring).

    `clients` (every server) and `broadcast` are set on the source rank only."""

    def __init__(self, clients: Sequence[ServerClient], ops: GroupOps,
                 broadcast: Callable[[Tensor], None] | None, group_name: str):
        self.clients = list(clients)
        self.ops = ops
        self.broadcast = broadcast
        self.group_name = group_name

    @property
    def is_source(self) -> bool:
        return bool(self.clients)

    def sync(self, buckets: Iterable[WeightBucket], weight_version: str | None = None) -> None:
        source = self.is_source

        def start() -> None:
            pause_and_flush(self.clients)
            begin_update(self.clients)

        _raise_agreed(self.ops, _leader_step(start, source))
        try:
            for bucket in buckets:
                _raise_agreed(self.ops, _leader_step(functools.partial(self._push, bucket, weight_version), source))
            _raise_agreed(self.ops, _leader_step(lambda: end_update(self.clients), source))
        except BaseException:
            abandon_update(self.clients)
            raise
        _raise_agreed(self.ops, _leader_step(lambda: continue_generation(self.clients), source))

    def payload(self, bucket: WeightBucket, weight_version: str | None = None) -> dict[str, Any]:
        return update_payload({"names": [name for name, _ in bucket], "dtypes": [dtype_name(t) for _, t in bucket],
                               "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name},
                              weight_version)

    def _push(self, bucket: WeightBucket, weight_version: str | None) -> None:
        broadcast = self.broadcast
        assert broadcast is not None  # pushed through _leader_step: on the source rank, which has it
        payload = self.payload(bucket, weight_version)
        pending = _post_concurrently(self.clients, "/update_weights_from_distributed",
                                     [payload] * len(self.clients))
        for _, tensor in bucket:
            broadcast(tensor)
        for client, answer in zip(self.clients, pending.wait()):
            _check_answer(answer, client, "update_weights_from_distributed")
