"""`build_sglang_engine`: placement, server launch or discovery, and the weight-sync wiring.

Everything touching torch.distributed or SGLang itself lives here, imported inside functions, so
that the package imports without SGLang (and the pure parts are tested on CPU).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from .client import ServerClient, SGLangServerError
from .engine import SGLangEngine
from .launcher import build_server_command, extra_args_from_env, free_port, launch_server
from .placement import colocated_server_groups, colocated_slot, disaggregated_url, replica_member
from .version import SUPPORTED_RANGE, check_sglang_version
from .weight_sync import DistributedSyncer, TensorSyncer, init_weights_update_group

URLS_ENV = "LITEPPO_SGLANG_URLS"            # comma-separated URLs, e.g. exported by a SLURM script
MASTER_ADDR_ENV = "LITEPPO_SGLANG_MASTER_ADDR"  # address the servers reach the source rank on
WEIGHT_GROUP = "liteppo_weight_update"


class TorchGroupOps:
    """`GroupOps` on torch.distributed: object gathers on a gloo group of the server's ranks, and error
    agreement over the whole job."""

    def __init__(self, server_group: Any = None, leader_rank: int = 0, is_leader: bool = True):
        self.server_group, self.leader_rank, self.is_leader = server_group, leader_rank, is_leader

    def gather_to_leader(self, obj: Any) -> list[Any] | None:
        import torch.distributed as dist

        if self.server_group is None:
            return [obj]
        out = [None] * dist.get_world_size(self.server_group) if self.is_leader else None
        dist.gather_object(obj, out, dst=self.leader_rank, group=self.server_group)
        return out

    def agree(self, error: str | None) -> str | None:
        import torch.distributed as dist

        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)


def gather_replica_fn(groups: Any) -> Callable[[Any], list[Any]]:
    """Gather one object per replica member over the TP, CP and PP groups (member order: pp, cp, tp)."""
    import torch.distributed as dist

    def gather(obj: Any) -> list[Any]:
        level: Any = obj
        for group, size in ((groups.tp_group, groups.tp_size), (groups.cp_group, groups.cp_size),
                            (groups.pp_group, groups.pp_size)):
            if size > 1:
                out: list[Any] = [None] * size
                dist.all_gather_object(out, level, group=group)
                level = out
            else:
                level = [level]
        return [item for pp_item in level for cp_item in pp_item for item in cp_item]

    return gather


def weight_serializer() -> Callable[[list[tuple[str, Any]]], tuple[Any, Any]]:
    """How buckets travel to a colocated server: SGLang's own serializer (CUDA IPC handles) on a GPU;
    without CUDA, the CPU wire format of `cpu_wire.py` (no CUDA IPC exists there)."""
    import importlib.util

    import torch

    if torch.cuda.is_available():
        if importlib.util.find_spec("sglang") is None:
            raise SGLangServerError(
                "colocated SGLang pushes the weights as CUDA IPC handles made by SGLang's own serializer, so "
                "the sglang package must be importable in the trainer's environment too (also when "
                "rollout.server_command runs the servers from another one): pip install --no-deps "
                f"'sglang{SUPPORTED_RANGE}' there.")
        return sglang_serialize
    from .cpu_wire import serialize_cpu_bucket

    return serialize_cpu_bucket


def sglang_serialize(named_tensors: list[tuple[str, Any]]) -> tuple[str, Any]:
    """One bucket (any mix of dtypes) -> SGLang's flattened-bucket payload, serialized (CUDA IPC handles
    on GPU)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    try:  # device-UUID based IPC handles, robust to CUDA_VISIBLE_DEVICES differences
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    monkey_patch_torch_reductions()
    bucket = FlattenedTensorBucket(named_tensors=[(n, t.detach().contiguous()) for n, t in named_tensors])
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return MultiprocessingSerializer.serialize(payload, output_str=True), payload


def _join_weight_group(timeout_s: float):
    def join(address: str, port: int, world_size: int) -> Any:
        try:
            from sglang.srt.utils.common import init_custom_process_group
        except ImportError:
            from sglang.srt.utils import init_custom_process_group
        return init_custom_process_group(backend="nccl", init_method=f"tcp://{address}:{port}",
                                         world_size=world_size, rank=0, group_name=WEIGHT_GROUP,
                                         timeout=timedelta(seconds=timeout_s))
    return join


def _broadcast_fn(group: Any):
    import torch
    import torch.distributed as dist

    def broadcast(tensor: Any) -> None:
        data = tensor.detach().to(torch.device("cuda", torch.cuda.current_device())).contiguous()
        dist.broadcast(data, src=0, group=group)
    return broadcast


def server_urls(configured: Sequence[str]) -> list[str]:
    urls = [u for u in configured if u] or [u.strip() for u in os.environ.get(URLS_ENV, "").split(",") if u.strip()]
    return [u if "://" in u else f"http://{u}" for u in urls]


def build_sglang_engine(cfg: Any, models: Any, groups: Any, eos_token_ids: Sequence[int]) -> SGLangEngine:
    """The SGLang engine of this rank (collective: every rank calls it).

    cfg: LitePPOConfig; models: liteppo_mcore.models.gpt.Models (unused beyond checks: the weights
    come through update_weights); groups: ParallelGroups; eos_token_ids: stop tokens by default."""
    import torch.distributed as dist

    if cfg.rollout.mode == "colocated" and not cfg.rollout.server_command:
        check_sglang_version()  # launched with this Python, which also serializes the weights
    if not dist.is_initialized():
        raise RuntimeError("build_sglang_engine needs the default process group (liteppo_mcore.parallel.setup)")
    member = replica_member(groups.tp_rank, groups.tp_size, groups.pp_rank, groups.cp_rank, groups.cp_size)
    members = groups.tp_size * groups.pp_size * groups.cp_size
    common = dict(member=member, members=members, gather_replica=gather_replica_fn(groups),
                  stream=groups.dp_rank, eos_token_ids=eos_token_ids)
    mode = cfg.rollout.mode
    if mode == "colocated":
        return _build_colocated(cfg, dist.get_rank(), dist.get_world_size(), common)
    if mode == "disaggregated":
        return _build_disaggregated(cfg, groups, dist.get_rank(), common)
    raise ValueError(f"rollout.mode must be colocated or disaggregated, got {mode!r}")


def _local_layout(rank: int, world: int) -> tuple[int, int]:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or min(world, _device_count() or world)
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_world))
    return local_rank, local_world


def _device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _build_colocated(cfg: Any, rank: int, world: int, common: dict) -> SGLangEngine:
    import torch.distributed as dist

    r = cfg.rollout
    local_rank, local_world = _local_layout(rank, world)
    slot = colocated_slot(rank, local_rank, local_world, r.tp)
    server_group = None
    for ranks in colocated_server_groups(world, local_world, r.tp):  # every rank creates every group
        group = dist.new_group(list(ranks), backend="gloo") if len(ranks) > 1 else None
        if slot.leader_rank == ranks[0]:
            server_group = group
    client, error = (_launch_colocated(cfg, slot) if slot.is_leader else (None, None))
    shared: list[Any] = [None] * world
    dist.all_gather_object(shared, (client.url if client else None, error))
    errors = [e for _, e in shared if e]
    if errors:
        if client is not None:
            assert client.process is not None  # launch_server's clients carry the process it started
            client.process.shutdown()
        raise SGLangServerError(f"launching the colocated SGLang servers failed: {errors[0]}")
    if client is None:
        client = ServerClient(shared[slot.leader_rank][0], timeout_s=r.request_timeout_s,
                              max_retries=r.max_retries)
    ops = TorchGroupOps(server_group, slot.leader_rank, slot.is_leader)
    syncer = TensorSyncer(client if slot.is_leader else None, ops, weight_serializer())
    owned = [client.process] if slot.is_leader else []
    return SGLangEngine(client=client, syncer=syncer, ops=ops, admin_clients=[client] if slot.is_leader else [],
                        manages_memory=True, owned=owned, **common)


def _launch_colocated(cfg: Any, slot: Any) -> tuple[ServerClient | None, str | None]:
    r = cfg.rollout
    if not cfg.model.hf_path:
        return None, ("rollout.engine=sglang needs model.hf_path: SGLang loads the architecture (and first "
                      "weights) from a Hugging Face directory; convert a checkpoint with the converter.")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = os.path.join(cfg.output_dir, "sglang")
    os.makedirs(log_dir, exist_ok=True)
    command = build_server_command(cfg.model.hf_path, port=port, tp=r.tp, base_gpu_id=slot.base_gpu_id,
                                   mem_fraction_static=r.mem_fraction_static, seed=cfg.seed,
                                   extra_args=extra_args_from_env(), launcher=r.server_command or None)
    try:
        client = launch_server(command, url, start_timeout_s=r.server_start_timeout_s,
                               request_timeout_s=r.request_timeout_s, max_retries=r.max_retries,
                               log_path=os.path.join(log_dir, f"server_{slot.server_index}.log"))
        _check_server(client)
    except Exception as exc:  # noqa: BLE001 - shared with every rank by the caller
        return None, f"{type(exc).__name__}: {exc}"
    return client, None


def _check_server(client: ServerClient) -> dict:
    """The server's /server_info; its version is read (and refused when unsupported) here, at connect."""
    info = client.server_info()
    client.protocol  # noqa: B018 - reads and checks the version, raising when unsupported
    return info


def _build_disaggregated(cfg: Any, groups: Any, rank: int, common: dict) -> SGLangEngine:
    r = cfg.rollout
    urls = server_urls(r.server_urls)
    if not urls:
        raise ValueError(f"rollout.mode=disaggregated needs rollout.server_urls (or {URLS_ENV})")
    url = disaggregated_url(urls, groups.dp_rank, common["member"], common["members"])
    client = ServerClient(url, timeout_s=r.request_timeout_s, max_retries=r.max_retries)
    ops = TorchGroupOps(None)
    admin: list[ServerClient] = []
    broadcast, error = None, None
    if rank == 0:
        admin = [ServerClient(u, timeout_s=r.request_timeout_s, max_retries=r.max_retries) for u in urls]
        try:
            broadcast = _connect_servers(admin, r)
        except Exception as exc:  # noqa: BLE001 - shared with every rank below
            error = f"{type(exc).__name__}: {exc}"
    error = ops.agree(error)
    if error:
        raise SGLangServerError(f"connecting to the SGLang servers failed: {error}")
    syncer = DistributedSyncer(admin, ops, broadcast, WEIGHT_GROUP)

    def destroy_group() -> None:
        for server in admin:
            server.request("/destroy_weights_update_group", {"group_name": WEIGHT_GROUP}, retries=0,
                           timeout_s=30.0)

    return SGLangEngine(client=client, syncer=syncer, ops=ops, admin_clients=admin, manages_memory=False,
                        on_shutdown=destroy_group if rank == 0 else None, **common)


def _connect_servers(clients: list[ServerClient], r: Any):
    tp_sizes = []
    for client in clients:
        client.wait_healthy(r.server_start_timeout_s)
        info = _check_server(client)
        if int(info.get("dp_size", 1) or 1) != 1 or int(info.get("pp_size", 1) or 1) != 1:
            raise SGLangServerError(f"{client.url} runs with dp_size/pp_size > 1; start one server per "
                                    "replica (list each URL in rollout.server_urls) with only --tp-size")
        if "tp_size" not in info:
            raise SGLangServerError(f"{client.url}/server_info reports no tp_size; cannot size the "
                                    "weights-update group")
        tp_sizes.append(int(info["tp_size"]))
    address = os.environ.get(MASTER_ADDR_ENV) or socket.gethostbyname(socket.gethostname())
    group = init_weights_update_group(clients, tp_sizes, master_address=address, master_port=free_port("0.0.0.0"),
                                      group_name=WEIGHT_GROUP, join=_join_weight_group(r.request_timeout_s))
    return _broadcast_fn(group)
