"""Pushing the trainer's weights into SGLang servers, bucket by bucket.

Order around every sync, on each server: pause generation -> flush the cache -> update -> continue.
Pausing (mode "retract") stops the scheduler so nothing runs on half-updated weights; flushing drops
KV/prefix entries computed with the old weights. Updates are sent with flush_cache=False, since the
cache is already empty and stays so while paused.

Colocated (`TensorSyncer`): every rank of a server flattens each bucket per dtype (SGLang's
"flattened_bucket" load format), serializes it (CUDA IPC handles on GPU, so no copy leaves the GPU),
the handles are gathered to the server's leader, and the leader sends one update_weights_from_tensor
per dtype bucket: entry i of the list is what SGLang's TP rank i opens. The senders keep their buffers
alive until the leader reports the call returned.

Disaggregated (`DistributedSyncer`): the trainer's source rank (global rank 0) and every server's TP
workers form an NCCL group (init_weights_update_group); per bucket, the source posts the names, dtypes
and shapes to every server (update_weights_from_distributed, which blocks in the servers' receive) and
broadcasts the tensors in the same order.

Failures are agreed on by all trainer ranks after each step (`GroupOps.agree`), so one server's error
raises on every rank instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from torch import Tensor

from ..engine import WeightBucket
from .client import ServerClient, SGLangServerError

PAUSE_MODE = "retract"
FLUSH_RETRY_STATUSES = (400, 500, 502, 503, 504)  # /flush_cache answers 400 while requests are pending
CHECK_TRUNCATE = 16


class GroupOps(Protocol):
    """The collectives a sync needs (torch.distributed in production, trivial ones in tests)."""

    def gather_to_leader(self, obj: Any) -> Optional[List[Any]]:
        """Gather `obj` from the ranks sharing this rank's server; the list on the leader, else None."""

    def agree(self, error: Optional[str]) -> Optional[str]:
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


def split_by_dtype(bucket: WeightBucket) -> List[WeightBucket]:
    """The bucket's tensors grouped by dtype (one flattened tensor per dtype), in first-seen order."""
    groups: "OrderedDict[Any, WeightBucket]" = OrderedDict()
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def dtype_name(tensor: Tensor) -> str:
    """SGLang's spelling of a dtype ("bfloat16"; it does getattr(torch, name))."""
    return str(tensor.dtype).replace("torch.", "")


class WeightChecker:
    """Keeps the first values of a few replicated 1-D weights (norms) seen during a sync and compares
    them with what the server reports through /get_weights_by_name (rollout.check_weight_sync)."""

    def __init__(self, enabled: bool, max_tensors: int = 2):
        self.enabled = enabled
        self.max_tensors = max_tensors
        self.samples: Dict[str, List[float]] = {}

    def observe(self, bucket: WeightBucket) -> None:
        if not self.enabled:
            return
        for name, tensor in bucket:
            if len(self.samples) < self.max_tensors and tensor.dim() == 1 and name.endswith("norm.weight"):
                self.samples[name] = tensor.detach().flatten()[:CHECK_TRUNCATE].float().cpu().tolist()

    def verify(self, client: ServerClient, atol: float = 2e-2) -> None:
        for name, expected in self.samples.items():
            answer = client.request("/get_weights_by_name", {"name": name, "truncate_size": CHECK_TRUNCATE})
            got = _flatten(answer)[:len(expected)]
            if len(got) != len(expected) or any(abs(g - e) > atol + atol * abs(e) for g, e in zip(got, expected)):
                raise SGLangServerError(
                    f"weight check failed on {client.describe()}: {name} is {got[:4]}... on the server but "
                    f"{expected[:4]}... in the trainer. The weight names or layout given to SGLang are wrong.")
        self.samples.clear()


def _flatten(value: Any) -> List[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flatten(item)]
    return [float(value)]


def _leader_step(action: Callable[[], None], is_leader: bool) -> Optional[str]:
    if not is_leader:
        return None
    try:
        action()
        return None
    except Exception as exc:  # noqa: BLE001 - reported to every rank through GroupOps.agree
        return f"{type(exc).__name__}: {exc}"


def _raise_agreed(ops: GroupOps, error: Optional[str]) -> None:
    error = ops.agree(error)
    if error:
        raise SGLangServerError(f"weight sync failed: {error}")


Serializer = Callable[[WeightBucket], Tuple[Any, Any]]  # dtype bucket -> (wire form, buffers to keep alive)


class TensorSyncer:
    """Colocated sync through update_weights_from_tensor (see the module docstring).

    `client` is set on the server's leader only; `serialize` turns a single-dtype bucket into what entry
    i of serialized_named_tensors carries (SGLang's serializer on GPU; tests pass their own)."""

    def __init__(self, client: Optional[ServerClient], ops: GroupOps, serialize: Serializer,
                 checker: Optional[WeightChecker] = None, load_format: str = "flattened_bucket"):
        self.client = client
        self.ops = ops
        self.serialize = serialize
        self.checker = checker or WeightChecker(False)
        self.load_format = load_format

    def sync(self, buckets: Iterable[WeightBucket]) -> None:
        leader = self.client is not None
        clients = [self.client] if leader else []
        _raise_agreed(self.ops, _leader_step(lambda: pause_and_flush(clients), leader))
        for bucket in buckets:
            self.checker.observe(bucket)
            for dtype_bucket in split_by_dtype(bucket):
                wire, keep_alive = self.serialize(dtype_bucket)
                gathered = self.ops.gather_to_leader(wire)
                error = _leader_step(lambda: self._send(gathered), leader)
                _raise_agreed(self.ops, error)  # the server has loaded (or failed) before buffers go
                del keep_alive
        _raise_agreed(self.ops, _leader_step(lambda: self.checker.verify(self.client), leader))
        _raise_agreed(self.ops, _leader_step(lambda: continue_generation(clients), leader))

    def _send(self, gathered: Optional[List[Any]]) -> None:
        payload = {"serialized_named_tensors": gathered, "load_format": self.load_format,
                   "flush_cache": False}
        _check_answer(self.client.request("/update_weights_from_tensor", payload, retries=0),
                      self.client, "update_weights_from_tensor")


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
    def __init__(self, threads: List[threading.Thread], results: List[Any]):
        self.threads, self.results = threads, results

    def wait(self, timeout_s: Optional[float] = None) -> List[Any]:
        for thread in self.threads:
            thread.join(timeout_s)
        for result in self.results:
            if isinstance(result, BaseException):
                raise result
        return self.results


def _post_concurrently(clients: Sequence[ServerClient], path: str, payloads: Sequence[Any]) -> _Concurrent:
    """POST to every server from its own thread (the calls block until the broadcast completes)."""
    results: List[Any] = [None] * len(clients)

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
                 broadcast: Optional[Callable[[Tensor], None]], group_name: str,
                 checker: Optional[WeightChecker] = None):
        self.clients = list(clients)
        self.ops = ops
        self.broadcast = broadcast
        self.group_name = group_name
        self.checker = checker or WeightChecker(False)

    @property
    def is_source(self) -> bool:
        return bool(self.clients)

    def sync(self, buckets: Iterable[WeightBucket]) -> None:
        source = self.is_source
        _raise_agreed(self.ops, _leader_step(lambda: pause_and_flush(self.clients), source))
        for bucket in buckets:
            self.checker.observe(bucket)
            _raise_agreed(self.ops, _leader_step(lambda: self._push(bucket), source))
        _raise_agreed(self.ops, _leader_step(self._verify, source))
        _raise_agreed(self.ops, _leader_step(lambda: continue_generation(self.clients), source))

    def payload(self, bucket: WeightBucket) -> Dict[str, Any]:
        return {"names": [name for name, _ in bucket], "dtypes": [dtype_name(t) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "flush_cache": False}

    def _push(self, bucket: WeightBucket) -> None:
        payload = self.payload(bucket)
        pending = _post_concurrently(self.clients, "/update_weights_from_distributed",
                                     [payload] * len(self.clients))
        for _, tensor in bucket:
            self.broadcast(tensor)
        for client, answer in zip(self.clients, pending.wait()):
            _check_answer(answer, client, "update_weights_from_distributed")

    def _verify(self) -> None:
        samples = dict(self.checker.samples)
        for client in self.clients:
            self.checker.samples = dict(samples)
            self.checker.verify(client)
