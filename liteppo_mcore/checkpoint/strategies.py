"""How the trainer's distributed checkpoints are written and read with megatron-core 0.16.1: the save and
load strategies, the distributed optimizer's checkpoint format, and the repairs that format needs with
torch's Adam. Files named below are under megatron/core/ of megatron-core 0.16.1.

    from liteppo_mcore.checkpoint import strategies

    # save (collective)
    model_sd = model.sharded_state_dict(prefix="actor.")
    state = {**model_sd, "optimizer_actor": optimizer.sharded_state_dict(
        model_sd, is_loading=False, metadata=strategies.optimizer_metadata())}
    dist_checkpointing.save(state, path, **strategies.save_kwargs(groups.dp_cp_group))

    # load (collective)
    strategies.init_empty_optimizer_states(optimizer)   # a distributed optimizer before its first step
    model_sd = model.sharded_state_dict(prefix="actor.")
    state = {**model_sd, "optimizer_actor": optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=strategies.optimizer_metadata())}
    loaded = dist_checkpointing.load(state, path, **strategies.load_kwargs(
        groups.dp_cp_group, fully_parallel=not use_distributed_optimizer))
    model.load_state_dict({k[len("actor."):]: v for k, v in loaded.items() if k.startswith("actor.")})
    strategies.load_optimizer_state_dict(optimizer, loaded["optimizer_actor"])

The same metadata must be given on save and on load (the optimizer builds different sharded state dicts
for each format). A checkpoint saved this way loads bit-identically at another DP, TP or PP size, with
either form of the load (tests/distributed/test_checkpoint_strategies.py). Disk and host-memory costs
per recipe: docs/recipes.md, "What a checkpoint costs".
"""

from __future__ import annotations

from typing import Any

SHARDED_BACKEND = ("torch_dist", 1)
# DistributedOptimizer.sharded_state_dict's metadata keys (optimizer/distrib_optimizer.py, 0.16.1)
SHARDING_TYPE_KEY = "distrib_optim_sharding_type"
MEM_EFFICIENT_KEY = "distrib_optim_fully_reshardable_mem_efficient"
# ChainedOptimizer.sharded_state_dict (optimizer/optimizer.py): no `chained_<i>.` key prefix for the
# fully reshardable formats, so the keys do not depend on how many optimizers megatron chained.
AVOID_CHAINED_PREFIX_KEY = "chained_optim_avoid_prefix"


def optimizer_metadata(*, mem_efficient: bool = True) -> dict[str, Any]:
    """The `metadata` of `optimizer.sharded_state_dict(model_sd, is_loading=..., metadata=...)`, on save
    and on load: {"distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True, "chained_optim_avoid_prefix": True}.

    The non-distributed optimizer ignores the first two keys (optimizer/optimizer.py: its fp32 main
    params and Adam states are ShardedTensors laid out like the weights and reshard like them). For the
    distributed optimizer, optimizer/distrib_optimizer.py (sharded_state_dict, the
    sharded_param_state_* and load_parameter_state_from_* methods) offers these formats; below N is the
    number of parameters of this rank's TP/PP shard, the optimizer state is 12 bytes per parameter
    (fp32 main param, exp_avg, exp_avg_sq), "B" means bytes per parameter of N, host memory only, and the
    measured figures are peak RSS growth per rank at DP 2 (test_save_and_load_host_memory, 37.8 M
    parameters per rank):

    - fully_reshardable, mem_efficient=True (CHOSEN). Save: get_parameter_state_dp_zero copies each
      rank's flat shards into host buffers (12/DP B) and `torch.distributed.gather`s them over the
      optimizer's gloo DP group into whole fp32 tensors per model parameter on DP RANK 0 ONLY; the other
      DP ranks return None for the parameter state. DP rank 0 holds the whole tensors (12 B), the
      gathered pieces and their concatenation of the previous and the current state at once (12 B; one
      bucket per buffer since overlap_grad_reduce is off) and its own flat copies, then the torch_dist
      writer clones every slice it writes (strategies/filesystem_async.py _clone_if_needed copies CPU
      views): peak 24 + 12/DP B on DP rank 0 (measured 30.0 B at DP 2), 12/DP B on every other rank
      (measured 7.3 B). No GPU memory. DP rank 0 writes all optimizer states, so the fully parallel
      save (which balances bytes) gives the weights to the other DP ranks.
      Load: every rank allocates the whole tensors on the host (12 B, `empty_data=True,
      return_on_all_ranks=True`: the flag changes nothing on load), reads them, keeps its own flat
      ranges; the SwiGLU linear_fc1 tensors are stored as two halves and concatenated into new tensors
      (dist_checkpointing/mapping.py apply_factory_merges), 12 B x their share of the parameters more
      (about half for the Qwen models): measured 16.7 B at DP 2 (fc1 a third of the parameters there,
      the bf16 weights' copy included, which on a GPU is device memory).
      The keys `optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>` are sharded like the weights,
      so the checkpoint reshards in DP, TP and PP.
    - fully_reshardable, mem_efficient=False (megatron's default for this format): the same tensors,
      all-gathered over NCCL to EVERY DP rank. During the gather each rank holds what DP rank 0 holds
      above, 24 + 12/DP B (measured 32.0 B at DP 2 on both ranks, device buffers included on CPU), plus
      a GPU receive buffer of 4 B (one bucket = the whole shard: 14.2 GiB at tp 2 for the 7B recipe) on
      top of training memory; the writing is then spread over DP. Same checkpoint layout on load.
    - dp_reshardable: the optimizer's own flat buffers as bucket-space ShardedTensors, no gather and no
      copy (the writer stages 12/DP B to the host on GPUs; measured 3.0 B on CPU, where nothing needs
      staging), by far the cheapest, but it reshards in DP only: the keys carry the DP group index of
      the TP/PP layout and load_parameter_state_from_dp_reshardable asserts the same bucket sizes (a TP 2
      or PP 2 load fails; the test checks this).
    - fully_sharded_model_space (the optimizer's default when the metadata names no format): 0.16.1
      rejects it when it builds the state dict (dist_checkpointing/mapping.py
      ShardedTensor.validate_metadata_integrity: "ShardedTensor.flattened_range is not supported").
    - dp_zero_gather_scatter (deprecated): the same gather to DP rank 0, saved as one pickled object per
      TP x PP rank: no TP/PP resharding.
    - fsdp_dtensor: Megatron FSDP only, which this trainer does not use.

    chained_optim_avoid_prefix (optimizer/optimizer.py ChainedOptimizer.sharded_state_dict): no
    `chained_<i>.` prefix on the keys for the fully reshardable formats, as Megatron-LM's training loop
    sets it; it only matters when megatron chains several optimizers (not for these models).
    """
    return {SHARDING_TYPE_KEY: "fully_reshardable", MEM_EFFICIENT_KEY: bool(mem_efficient),
            AVOID_CHAINED_PREFIX_KEY: True}


def init_empty_optimizer_states(optimizer: Any) -> bool:
    """Give every distributed optimizer in `optimizer` that has not stepped yet zero Adam states and a
    step count of 0, so that `optimizer.sharded_state_dict(..., is_loading=True)` can be built; returns
    whether anything was initialized. Call it before building the load state dict (a no-op once the
    optimizer has stepped; the non-distributed optimizer initializes its own states there).

    Why: with torch's Adam (no Transformer Engine or Apex, as in this environment)
    DistributedOptimizer.sharded_state_dict(is_loading=True) first calls its own state_dict(), which
    reads the `step` of every Adam state and asserts there is exactly one value
    (optimizer/distrib_optimizer.py state_dict); before the first step torch's Adam has no states, so
    loading into a freshly built distributed optimizer fails with a bare AssertionError. The zeros (and
    the step) are overwritten by the load. The states are allocated where the main parameters are (on
    the GPU), as the optimizer's load_state_dict would allocate them anyway.
    """
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    changed = False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None or len(inner.state) > 0:
            continue
        if opt.init_state_fn is None:
            raise RuntimeError(f"{type(inner).__name__} has no state initializer; only Adam optimizers "
                               "can be loaded into before their first step")
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                # torch's Adam keeps `step` as a float32 host scalar (not capturable, not fused)
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))
        changed = True
    return changed


def load_optimizer_state_dict(optimizer: Any, state_dict: Any) -> None:
    """`optimizer.load_state_dict(state_dict)` for what dist_checkpointing.load returned for
    `optimizer.sharded_state_dict(..., is_loading=True, metadata=optimizer_metadata())`, with the
    distributed optimizer's fully_reshardable loader repaired for torch's Adam.

    Why: DistributedOptimizer.load_state_dict first puts the checkpoint's step count into every Adam
    state (`state["step"]`, torch's Adam keeps one per parameter), then
    load_parameter_state_from_fully_reshardable hands _set_main_param_and_optimizer_states the loaded
    tensors without `step` (it skips that key on purpose), and that method copies every key of the
    DESTINATION state: KeyError 'step' (optimizer/distrib_optimizer.py, megatron-core 0.16.1; with TE or
    Apex FusedAdam the step lives in the param groups and neither problem here occurs). Here each
    distributed optimizer gets, for the duration of the call only, an instance-level
    _set_main_param_and_optimizer_states that passes its own (just loaded) step along with the loaded
    tensors, so the step is copied onto itself and everything else exactly as megatron does.

    Second repair, same cause: load_state_dict gives every Adam state the SAME step tensor object
    (`s["step"] = step` in a loop; torch's Optimizer.load_state_dict keeps `step` tensors as they are
    when not capturable/fused), and torch's Adam increments each parameter's step in place, so after
    the first step the shared counter would have advanced once per parameter and every later bias
    correction would be wrong. Each state gets its own copy afterwards. (The non-distributed optimizer
    deep-copies its common step itself: optimizer.py _restore_common_per_param_step.)
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    distributed = [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                   if isinstance(opt, DistributedOptimizer)]
    patched = []
    for opt in distributed:
        if "_set_main_param_and_optimizer_states" not in vars(opt):
            opt._set_main_param_and_optimizer_states = _keeping_own_step(opt)
            patched.append(opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    unshare_step_counters(optimizer)


def unshare_step_counters(optimizer: Any) -> int:
    """Give every Adam state of the distributed optimizers in `optimizer` its own `step` tensor; returns
    how many were shared. See load_optimizer_state_dict: any DistributedOptimizer.load_state_dict with
    torch's Adam leaves one tensor shared by all states, which includes the one megatron runs inside
    `sharded_state_dict(..., is_loading=True)` (`self.load_state_dict(self.state_dict())`)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    shared = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or inner is None:
            continue
        seen = set()
        for state in inner.state.values():
            step = state.get("step")
            if step is None or not hasattr(step, "clone"):
                continue
            if id(step) in seen:
                state["step"] = step.clone()
                shared += 1
            seen.add(id(state["step"]))
    return shared


def _keeping_own_step(opt: Any) -> Any:
    original = opt._set_main_param_and_optimizer_states  # the class's method, bound to `opt`

    def set_states(model_param: Any, tensors: dict[str, Any]) -> None:
        if "step" not in tensors and not getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        original(model_param, tensors)

    return set_states


def common_state_for_consistency_check(common: Any) -> Any:
    """The common state dict as the save's consistency check should compare it across ranks: without
    the distributed optimizer's `param_state` entries that are None.

    Why: with the mem-efficient fully_reshardable format only DP rank 0 returns the optimizer's
    parameter state (sharded tensors, which leave nothing in the common state); the other DP ranks
    return None, which would make validate_sharding_integrity (dist_checkpointing/validation.py
    _validate_common_state_dict) warn at every save that their common state differs from rank 0's. The
    original dict is not modified (megatron's requirement for this hook)."""
    if isinstance(common, dict):
        out = {}
        for key, value in common.items():
            if key == "param_state" and value is None and "param_state_sharding_type" in common:
                continue
            out[key] = common_state_for_consistency_check(value)
        return out
    return common


def save_strategy(parallel_group: Any | None) -> Any:
    """megatron's FullyParallelSaveStrategyWrapper (dist_checkpointing/strategies/fully_parallel.py) over
    the default torch_dist save strategy (serialization.py get_default_save_sharded_strategy:
    strategies/torch.py TorchDistSaveShardedStrategy; each saving rank writes up to 2 files from 2 forked
    writer processes, and starts one spawned multiprocessing manager on its first save).

    Without the wrapper a tensor replicated over data parallelism is written by the rank whose
    replica_id is 0, i.e. DP rank 0 writes, and first stages in host memory, every weight and every
    non-distributed optimizer state of its TP/PP shard (14 bytes per parameter for a bf16 model). The
    wrapper exchanges only metadata (one all_gather_object of the shard list over the group) and gives
    each replicated shard to one rank of the group, balancing bytes: each rank writes and stages about
    1/DP of them. No tensor data moves between ranks.

    `parallel_group`: the data-parallel group WITH context parallelism (`groups.dp_cp_group`), over which
    megatron replicates the weights (their replica_id counts DP x CP ranks, transformer/utils.py) and
    shards the distributed optimizer; None means the whole world; a group of one rank makes the wrapper
    a pass-through.

    do_cache_distribution=False: a cached distribution skips the metadata exchange AND the integrity
    check of later saves, and is only valid while every save has exactly the same shards on every rank;
    a strategy is built per save, so there is nothing to reuse. Not caching costs one all_gather_object
    of shard metadata per save.
    """
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    base = get_default_save_sharded_strategy(*SHARDED_BACKEND)
    return FullyParallelSaveStrategyWrapper(base, parallel_group, do_cache_distribution=False)


def load_strategy(parallel_group: Any | None) -> Any:
    """megatron's FullyParallelLoadStrategyWrapper (dist_checkpointing/strategies/fully_parallel.py) over
    the torch_dist load strategy (strategies/torch.py TorchDistLoadShardedStrategy, what
    get_default_load_sharded_strategy picks for these checkpoints; dist_checkpointing.load still checks
    that the checkpoint's metadata.json names torch_dist). It works under gloo on CPU.

    Each shard that several ranks of `parallel_group` need is read by one of them and broadcast to the
    others (exchange_algo="broadcast", megatron's default; dist_checkpointing/exchange_utils.py), so
    storage is read about once per group instead of once per rank. Tensors that live on the GPU (the
    weights, the non-distributed optimizer's states) are broadcast into place. Tensors that live on the
    host (the distributed optimizer's whole fp32 tensors of the fully_reshardable format) each go to
    the GPU for the broadcast and come back as a NEW host tensor (exchange_loaded_tensors_broadcast:
    `.cuda()` ... `.to(orig_device)`), while the buffers they were meant to fill stay referenced by the
    caller's state dict: about 8 more bytes per parameter on the host during the load (measured at
    DP 2: 24.7 B against 16.7 B without the wrapper; see load_kwargs). Same group as save_strategy.
    """
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), parallel_group,
                                            do_cache_distribution=False, exchange_algo="broadcast")


def save_kwargs(parallel_group: Any | None) -> dict[str, Any]:
    """Keyword arguments of `dist_checkpointing.save(state, dir, **save_kwargs(group))`
    (dist_checkpointing/serialization.py save):

    - sharded_strategy: save_strategy(group);
    - validate_access_integrity=True: before writing, rank 0 checks that every shard has exactly one
      main replica and that the common state (the `liteppo` dict) is the same on every rank (a warning
      when not); it costs one all_gather_object of metadata;
    - async_sharded_save=False: the data is on disk when save returns, which the atomic rename of the
      iteration folder relies on (an async request would have to be scheduled and finalized by the caller);
    - preprocess_common_before_consistancy_check (megatron's spelling): common_state_for_consistency_check.
    """
    return {"sharded_strategy": save_strategy(parallel_group), "validate_access_integrity": True,
            "async_sharded_save": False,
            "preprocess_common_before_consistancy_check": common_state_for_consistency_check}


def load_kwargs(parallel_group: Any | None, *, fully_parallel: bool) -> dict[str, Any]:
    """Keyword arguments of `dist_checkpointing.load(state, dir, **load_kwargs(group, fully_parallel=...))`
    (dist_checkpointing/serialization.py load):

    - sharded_strategy: load_strategy(group) when `fully_parallel`, else None (megatron picks the
      torch_dist strategy from metadata.json and every rank reads everything it needs itself). Pass
      `fully_parallel=not use_distributed_optimizer`: with the distributed optimizer every rank needs the
      optimizer's whole tensors of its TP/PP shard anyway and the wrapper would hold a second host copy
      of them (load_strategy); without it the wrapper costs no host memory and divides the reads by DP;
    - validate_access_integrity=True: every requested shard must have a main replica (one
      all_gather_object of metadata);
    - strict="assume_ok_unexpected" (megatron's default): missing keys fail inside the loader, so name
      them first (store.check_against_checkpoint).
    """
    return {"sharded_strategy": load_strategy(parallel_group) if fully_parallel else None,
            "validate_access_integrity": True, "strict": "assume_ok_unexpected"}
