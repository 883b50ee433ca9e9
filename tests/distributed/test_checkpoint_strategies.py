"""The checkpoint strategies (liteppo_mcore/checkpoint/strategies.py) in gloo processes: a model and its
optimizer, after optimizer steps (non-zero Adam states), saved at DP 2 with megatron's fully parallel
save and the distributed optimizer's fully_reshardable (mem-efficient) format, load bit-identically at
DP 2, at one process, at TP 2 and at PP 2, with the distributed and with the non-distributed optimizer,
through megatron's fully parallel load and without it.

"Bit-identical" is checked three ways: at the saving layout the optimizer's own tensors (fp32 main
params, exp_avg, exp_avg_sq, step) after the load equal those before the save, and the next optimizer
step gives exactly the weights the uninterrupted run gives; at every layout the loaded state saved
again holds exactly the tensors of the original checkpoint (compared as whole tensors, which do not
depend on the layout).

test_save_and_load_host_memory measures the peak host memory of a save per rank with the
fully_reshardable format with and without the mem-efficient flag (and dp_reshardable for scale) on a
larger model; it prints the numbers (run with -s) and asserts only their order.
"""

import ctypes
import gc
import logging
import os
import threading
import time

import pytest
import torch

from tests.distributed.spawn import run_gloo

VOCAB = 100
N = 8  # responses per step: one optimizer update per step (one mini-batch, one epoch)
RESPONSE = 8
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96", "model.num_attention_heads=4",
         "model.num_query_groups=2", f"model.vocab_size={VOCAB}", "model.max_position_embeddings=64",
         "model.dtype=bf16", "model.init_std=0.1"]
TRAIN = ["rollout_batch_size=4", "num_return_sequences_in_group=2", f"train.mini_batch_size={N}",
         "train.micro_batch_size=2", "ppo_epochs=1", "train.optimizer=adamw", "train.lr=0.01",
         "train.weight_decay=0.01", "train.clip_grad=0", f"response_length={RESPONSE}", "prompt_length=8"]
KINDS = {"distopt": True, "plain": False}  # kind -> train.use_distributed_optimizer
LAYOUTS = ["dp2", "dp1", "tp2", "pp2"]  # where the checkpoint saved at DP 2 is loaded and saved again


# ---------------------------------------------------------------------------- helpers in the workers
def _build(ws, dist_opt, *, tp=1, pp=1, scramble=False, model=MODEL):
    from liteppo_mcore.config import load_config
    from liteppo_mcore.models.gpt import build_models
    from liteppo_mcore.parallel.mcore import initialize_model_parallel
    from liteppo_mcore.update import ModelUpdater

    overrides = model + TRAIN + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                 f"train.use_distributed_optimizer={str(dist_opt).lower()}"]
    cfg = load_config("examples/tiny_cpu.yaml", overrides=overrides, world_size=ws)
    groups = initialize_model_parallel(tp, pp, 1, seed=cfg.seed)
    models = build_models(cfg, groups)
    if scramble:  # other weights than the saved ones (the seed must stay: it orders the mini-batches)
        g = torch.Generator().manual_seed(1234 + groups.tp_rank)
        with torch.no_grad():
            for param in models.actor.parameters():
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype))
    updater = ModelUpdater(models.actor, "actor", cfg, groups, vocab_size=VOCAB)
    return models.actor, updater, groups


def _batch(step, vocab=VOCAB):
    """The same random step batch on every rank (the trainer gathers it over DP)."""
    from liteppo_mcore.update import TrainBatch

    g = torch.Generator().manual_seed(100 + step)
    prompt_lens = torch.randint(2, 7, (N,), generator=g)
    response_lens = torch.randint(1, RESPONSE + 1, (N,), generator=g)
    tokens = torch.randint(0, vocab, (N, int((prompt_lens + response_lens).max())), generator=g)
    mask = torch.arange(RESPONSE)[None, :] < response_lens[:, None]
    advantages = torch.where(mask, torch.randn(N, RESPONSE, generator=g), torch.zeros(()))
    return TrainBatch(tokens=tokens, prompt_lens=prompt_lens, response_lens=response_lens, advantages=advantages)


def _step(updater, step):
    updater.update(_batch(step), step=step)
    assert updater.num_updates == step


def _optimizer_tensors(optimizer):
    """This rank's optimizer tensors in a fixed order: per parameter of the inner torch optimizer its
    fp32 main parameter and its Adam states (exp_avg, exp_avg_sq, step), as host copies."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                out.append({"param": param.detach().cpu().clone(),
                            **{k: v.detach().cpu().clone() for k, v in state.items()}})
    return out


def _save(model, optimizer, path, groups, metadata=None):
    from megatron.core import dist_checkpointing

    from liteppo_mcore.checkpoint import strategies

    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    model_sd = model.sharded_state_dict(prefix="actor.")
    state = dict(model_sd)
    state["optimizer_actor"] = optimizer.sharded_state_dict(
        model_sd, is_loading=False, metadata=metadata or strategies.optimizer_metadata())
    state["liteppo"] = {"format": 1}
    dist_checkpointing.save(state, path, **strategies.save_kwargs(groups.dp_cp_group))


def _load(model, optimizer, path, groups, *, fully_parallel=True, metadata=None):
    from megatron.core import dist_checkpointing

    from liteppo_mcore.checkpoint import strategies

    strategies.init_empty_optimizer_states(optimizer)
    model_sd = model.sharded_state_dict(prefix="actor.")
    state = dict(model_sd)
    state["optimizer_actor"] = optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata=metadata or strategies.optimizer_metadata())
    loaded = dist_checkpointing.load(state, path, **strategies.load_kwargs(groups.dp_cp_group,
                                                                          fully_parallel=fully_parallel))
    model.load_state_dict({k[len("actor."):]: v for k, v in loaded.items() if k.startswith("actor.")}, strict=True)
    strategies.load_optimizer_state_dict(optimizer, loaded["optimizer_actor"])
    return loaded["liteppo"]


def _equal_lists(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _equal_dicts(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DP_RESHARDABLE = {"distrib_optim_sharding_type": "dp_reshardable"}


def _model_space_rejected(model, optimizer):
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        optimizer.sharded_state_dict(model.sharded_state_dict(prefix="actor."), is_loading=False,
                                     metadata={"distrib_optim_sharding_type": "fully_sharded_model_space"})
    except CheckpointingException as e:
        return "flattened_range is not supported" in str(e)
    return False


def _fresh_distopt_load_fails(ws):
    """megatron 0.16.1 without TE/Apex: a distributed optimizer that has not stepped cannot build its
    load state dict (what init_empty_optimizer_states works around)."""
    from liteppo_mcore.checkpoint import strategies
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    model, updater, _ = _build(ws, True)
    try:
        updater.optimizer.sharded_state_dict(model.sharded_state_dict(prefix="actor."), is_loading=True,
                                             metadata=strategies.optimizer_metadata())
        failed = False
    except AssertionError:
        failed = True
    destroy_model_parallel()
    return failed


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------- the workers
def save_worker(rank, ws, root):
    """DP 2: two steps, save, a third step (the reference); then fresh models with other initial
    weights load the checkpoint (fully parallel and not), match the saved state exactly, save it
    again, and their third step matches the reference bit for bit."""
    from liteppo_mcore.models.state import whole_state_dict
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    warnings = _Records()  # megatron's cross-rank check of the common state warns here
    logging.getLogger("megatron.core.dist_checkpointing.validation").addHandler(warnings)
    out = {"fresh_distopt_load_fails": _fresh_distopt_load_fails(ws)}
    for kind, dist_opt in KINDS.items():
        model, updater, groups = _build(ws, dist_opt)
        assert groups.dp_size == 2
        _step(updater, 1)
        _step(updater, 2)
        saved_weights = whole_state_dict(model, groups, VOCAB)
        saved_optimizer = _optimizer_tensors(updater.optimizer)
        _save(model, updater.optimizer, os.path.join(root, f"{kind}_saved"), groups)
        if dist_opt:
            # the alternatives: dp_reshardable saves (load_worker: it does not reshard in TP or PP),
            # the default format of 0.16.1 cannot even be built
            _save(model, updater.optimizer, os.path.join(root, "dp_reshardable"), groups, metadata=DP_RESHARDABLE)
            out["model_space_rejected"] = _model_space_rejected(model, updater.optimizer)
        _step(updater, 3)
        reference = whole_state_dict(model, groups, VOCAB)
        destroy_model_parallel()
        res = {"adam_nonzero": all(bool(t["exp_avg"].abs().max() > 0) for t in saved_optimizer),
               "steps": sorted({float(t["step"]) for t in saved_optimizer}),
               "main_dtypes": sorted({str(t["param"].dtype) for t in saved_optimizer}),
               "n_local": sum(t["param"].numel() for t in saved_optimizer)}
        for fully_parallel in (True, False):
            model, updater, groups = _build(ws, dist_opt, scramble=True)
            res[f"fresh_differs_{fully_parallel}"] = not _equal_dicts(whole_state_dict(model, groups, VOCAB),
                                                                    saved_weights)
            common = _load(model, updater.optimizer, os.path.join(root, f"{kind}_saved"), groups,
                           fully_parallel=fully_parallel)
            res[f"common_{fully_parallel}"] = common
            res[f"weights_equal_{fully_parallel}"] = _equal_dicts(whole_state_dict(model, groups, VOCAB),
                                                                 saved_weights)
            res[f"optimizer_equal_{fully_parallel}"] = _equal_lists(_optimizer_tensors(updater.optimizer),
                                                                    saved_optimizer)
            if fully_parallel:
                _save(model, updater.optimizer, os.path.join(root, f"{kind}_resaved_dp2"), groups)
            updater.num_updates = 2  # the trainer restores it from the common state
            _step(updater, 3)
            res[f"next_step_equal_{fully_parallel}"] = _equal_dicts(whole_state_dict(model, groups, VOCAB),
                                                                    reference)
            destroy_model_parallel()
        out[kind] = res
    out["validation_warnings"] = warnings.messages
    return out


def load_worker(rank, ws, root, name, tp=1, pp=1):
    """Another layout (one process, TP 2 or PP 2): load, save again as `<kind>_resaved_<name>`; report
    the local shard size."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    out = {}
    model, updater, groups = _build(ws, True, tp=tp, pp=pp, scramble=True)
    try:
        _load(model, updater.optimizer, os.path.join(root, "dp_reshardable"), groups, metadata=DP_RESHARDABLE)
        out["dp_reshardable"] = "loaded"
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - the kind of failure is the result
        out["dp_reshardable"] = f"{type(e).__name__}: {str(e)[:300]}"
    destroy_model_parallel()
    for kind, dist_opt in KINDS.items():
        model, updater, groups = _build(ws, dist_opt, tp=tp, pp=pp, scramble=True)
        _load(model, updater.optimizer, os.path.join(root, f"{kind}_saved"), groups)
        tensors = _optimizer_tensors(updater.optimizer)
        out[kind] = {"dp": groups.dp_size, "tp": groups.tp_size, "pp": groups.pp_size,
                     "n_local": sum(t["param"].numel() for t in tensors),
                     "steps": sorted({float(t["step"]) for t in tensors})}
        _save(model, updater.optimizer, os.path.join(root, f"{kind}_resaved_{name}"), groups)
        destroy_model_parallel()
    return out


def _whole_tensors(path):
    """Every tensor of a checkpoint, whole, by its checkpoint key (one process; load_plain_tensors also
    returns the common state, which is left out)."""
    from megatron.core import dist_checkpointing

    flat = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    visit("", dist_checkpointing.load_plain_tensors(path))
    return flat


def compare_worker(rank, ws, root, names):
    """Whole tensors of each re-saved checkpoint against the original (one process)."""
    out = {}
    for kind in KINDS:
        original = _whole_tensors(os.path.join(root, f"{kind}_saved"))
        written = {}  # bytes per saving rank: the files are __<rank>_<i>.distcp
        for name in os.listdir(os.path.join(root, f"{kind}_saved")):
            if name.endswith(".distcp"):
                rank_ = int(name.split("_")[2])
                written[rank_] = written.get(rank_, 0) + os.path.getsize(os.path.join(root, f"{kind}_saved", name))
        out[kind] = {"keys": sorted(original), "written": written}
        for name in names:
            again = _whole_tensors(os.path.join(root, f"{kind}_resaved_{name}"))
            problems = []
            if set(again) != set(original):
                problems.append(f"keys differ: {sorted(set(again) ^ set(original))}")
            for key in sorted(set(again) & set(original)):
                a, b = original[key], again[key]
                if a.shape != b.shape:
                    # the vocabulary is padded to a multiple of 128 x tp: compare the common rows, the
                    # extra rows must be zero
                    rows = min(a.shape[0], b.shape[0])
                    if a.shape[1:] != b.shape[1:] or bool(a[rows:].abs().sum() + b[rows:].abs().sum()):
                        problems.append(f"{key}: {tuple(a.shape)} vs {tuple(b.shape)}")
                        continue
                    a, b = a[:rows], b[:rows]
                if a.dtype != b.dtype or not torch.equal(a, b):
                    problems.append(f"{key}: values differ")
            out[kind][name] = problems
    return out


def test_checkpoint_round_trip_is_exact_at_every_layout(tmp_path):
    root = str(tmp_path)
    dp2 = run_gloo(save_worker, 2, root, timeout=600)
    tp2 = run_gloo(load_worker, 2, root, "tp2", 2, 1, timeout=400)
    pp2 = run_gloo(load_worker, 2, root, "pp2", 1, 2, timeout=400)
    (one,) = run_gloo(load_worker, 1, root, "dp1", timeout=400)
    (cmp,) = run_gloo(compare_worker, 1, root, LAYOUTS, timeout=300)

    assert all(r["fresh_distopt_load_fails"] and r["model_space_rejected"] for r in dp2)
    # DP rank 1 has no optimizer parameter state in the mem-efficient format: not reported as a mismatch
    assert all(r["validation_warnings"] == [] for r in dp2), [r["validation_warnings"] for r in dp2]
    # dp_reshardable: another DP size loads, another TP or PP size does not
    assert one["dp_reshardable"] == "loaded", one["dp_reshardable"]
    assert all(r["dp_reshardable"] != "loaded" for r in tp2 + pp2), [r["dp_reshardable"] for r in tp2 + pp2]
    for r in dp2:
        for kind in KINDS:
            res = r[kind]
            assert res["adam_nonzero"] and res["steps"] == [2.0], (kind, res)
            assert res["main_dtypes"] == ["torch.float32"], (kind, res)  # bf16 model, fp32 main params
            for fp in (True, False):
                assert res[f"fresh_differs_{fp}"], (kind, fp)
                assert res[f"common_{fp}"] == {"format": 1}
                assert res[f"weights_equal_{fp}"], (kind, fp)
                assert res[f"optimizer_equal_{fp}"], (kind, fp)
                assert res[f"next_step_equal_{fp}"], (kind, fp)
    # the distributed optimizer holds half of the states per rank at DP 2, all of them at DP 1 / TP 1
    total = dp2[0]["plain"]["n_local"]
    assert dp2[0]["distopt"]["n_local"] + dp2[1]["distopt"]["n_local"] == total
    assert dp2[0]["distopt"]["n_local"] < total
    assert one["distopt"]["n_local"] == total and one["distopt"]["dp"] == 1
    assert all(r["distopt"]["tp"] == 2 and r["distopt"]["n_local"] < total for r in tp2)
    assert all(r["distopt"]["pp"] == 2 and r["distopt"]["n_local"] < total for r in pp2)
    for res in [one[k] for k in KINDS] + [r[k] for r in tp2 + pp2 for k in KINDS]:
        assert res["steps"] == [2.0], res
    # the fully parallel save: both DP ranks write the replicated tensors, about half each without the
    # distributed optimizer; with it DP rank 0 writes all optimizer states (mem-efficient gather)
    plain, distopt = cmp["plain"]["written"], cmp["distopt"]["written"]
    assert sorted(plain) == [0, 1] and 0.3 < plain[1] / (plain[0] + plain[1]) < 0.7, plain
    assert sorted(distopt) == [0, 1] and 0 < distopt[1] < distopt[0] / 3, distopt
    for kind in KINDS:
        keys = cmp[kind]["keys"]
        assert any(k.startswith("optimizer.state.exp_avg_sq.actor.") for k in keys), keys
        assert any(k.startswith("optimizer.state.exp_avg.actor.") for k in keys), keys
        main = "param" if kind == "distopt" else "fp32_param"
        assert any(k.startswith(f"optimizer.state.{main}.actor.") for k in keys), keys
        for name in LAYOUTS:
            assert cmp[kind][name] == [], (kind, name, cmp[kind][name])


# ---------------------------------------------------------------------------- host memory of a save
BIG_VOCAB = 16384
BIG_MODEL = ["model.num_layers=4", "model.hidden_size=768", "model.ffn_hidden_size=2048",
             "model.num_attention_heads=12", "model.num_query_groups=4", f"model.vocab_size={BIG_VOCAB}",
             "model.max_position_embeddings=64", "model.dtype=bf16", "model.init_std=0.02"]


class _PeakRSS:
    """Peak resident set size of this process above its value at entry, sampled every millisecond."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def grown(self):
        return self.peak - self.base


def memory_worker(rank, ws, root):
    from liteppo_mcore.checkpoint import strategies
    from liteppo_mcore.parallel.mcore import destroy_model_parallel

    # every allocation above 64 KiB gets its own mapping, returned when freed: the RSS then follows the
    # live tensors instead of what the heap keeps
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD
    model, updater, groups = _build(ws, True, model=BIG_MODEL)
    updater.update(_batch(1, BIG_VOCAB), step=1)
    n_local = sum(p.numel() for p in model.parameters())
    out = {"params": n_local, "rank": rank}
    formats = {
        "fully_reshardable": strategies.optimizer_metadata(mem_efficient=False),
        "fully_reshardable_mem_efficient": strategies.optimizer_metadata(mem_efficient=True),
        "dp_reshardable": {"distrib_optim_sharding_type": "dp_reshardable"},
    }
    for name, metadata in formats.items():
        with _PeakRSS() as peak:
            _save(model, updater.optimizer, os.path.join(root, name), groups, metadata=metadata)
        torch.distributed.barrier()
        out[f"save/{name}"] = peak.grown
    for fully_parallel in (True, False):
        with _PeakRSS() as peak:
            _load(model, updater.optimizer, os.path.join(root, "fully_reshardable_mem_efficient"), groups,
                  fully_parallel=fully_parallel)
        out[f"load/{'fully_parallel' if fully_parallel else 'plain'}"] = peak.grown
    destroy_model_parallel()
    return out


@pytest.mark.slow
def test_save_and_load_host_memory(tmp_path):
    results = run_gloo(memory_worker, 2, str(tmp_path), timeout=900)
    for r in results:
        n = r["params"]
        print(f"rank {r['rank']}: {n / 1e6:.1f} M parameters; peak host memory above the state before, "
              "MiB (bytes per parameter):")
        for key, value in r.items():
            if "/" in key:
                print(f"  {key:40s} {value / 2**20:8.1f}  ({value / n:5.1f})")
    rank0, rank1 = results
    # the mem-efficient gather leaves the whole tensors on DP rank 0 only
    assert rank1["save/fully_reshardable_mem_efficient"] < rank1["save/fully_reshardable"]
    assert rank1["save/dp_reshardable"] < rank1["save/fully_reshardable"]
