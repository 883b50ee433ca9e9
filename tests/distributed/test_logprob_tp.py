"""Vocab-parallel log-prob / entropy / full KL at TP=2 and TP=4 against log_softmax on the full logits.

Every rank builds the same full logits, keeps its vocabulary shard, and reports values and the gradient
of its shard; the parent compares them with plain torch on the full (gathered) logits.
"""

import torch
import torch.distributed as dist

from tests.distributed.spawn import run_gloo

N, V, TEMPERATURE = 23, 48, 0.7


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    other = torch.randn(N, V, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (N,), generator=gen)
    w_logp = torch.randn(N, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(N, generator=gen, dtype=torch.float64)
    return logits, other, targets, w_logp, w_ent


def _shard_grad(fn, shard, w_logp, w_ent):
    leaf = shard.clone().requires_grad_(True)
    logp, ent = fn(leaf)
    loss = (w_logp.to(logp.dtype) * logp).sum()
    if ent.requires_grad:
        loss = loss + (w_ent.to(ent.dtype) * ent).sum()
    loss.backward()
    return {"logp": logp.detach(), "ent": ent.detach(), "grad": leaf.grad}


def _tp_group(rank, world_size, tp):
    """This rank's group of ``tp`` consecutive ranks; every rank creates every group, in order."""
    mine = None
    for start in range(0, world_size, tp):
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return mine


def _worker(rank, world_size, bounds_by_tp):
    # One launch serves TP=2 (two groups side by side) and TP=4: process start-up dominates the runtime.
    return {tp: _tp_checks(rank % tp, tp, _tp_group(rank, world_size, tp), bounds)
            for tp, bounds in bounds_by_tp.items()}


def _tp_checks(rank, world_size, group, bounds):
    from liteppo_mcore.models.logprob import (
        logprob_entropy_at,
        vocab_parallel_full_kl,
        vocab_parallel_logprob_entropy,
        vocab_parallel_logprob_entropy_from_hidden,
    )

    logits, other, targets, w_logp, w_ent = _inputs()
    v_local = V // world_size
    cols = slice(rank * v_local, (rank + 1) * v_local)
    even64, even32 = logits[:, cols], logits[:, cols].float()
    out = {}
    common = dict(tp_group=group, temperature=TEMPERATURE)
    for name, shard in (("f64", even64), ("f32", even32)):
        out[name] = _shard_grad(lambda x: vocab_parallel_logprob_entropy(
            x, targets, entropy_grad=True, chunk_size=5, **common), shard, w_logp, w_ent)
        out[name + "_kl"] = vocab_parallel_full_kl(shard, other[:, cols].to(shard.dtype), chunk_size=4, **common)
    out["f32_no_ent_grad"] = _shard_grad(lambda x: vocab_parallel_logprob_entropy(
        x, targets, **common), even32, w_logp, w_ent)
    # Uneven shards, the last one ending in 3 padding columns outside the vocabulary. Shifted far below 0
    # (softmax does not change): a shard of padding only must not set the merged maximum.
    lo, hi = bounds[rank], bounds[rank + 1]
    padded = torch.cat([logits - 2000, torch.full((N, 3), 7.0, dtype=torch.float64)], dim=1)[:, lo:hi]
    out["uneven"] = _shard_grad(lambda x: vocab_parallel_logprob_entropy(
        x, targets, vocab_start=lo, vocab_size=V, entropy_grad=True, **common), padded, w_logp, w_ent)
    out["uneven_kl"] = vocab_parallel_full_kl(
        padded, padded.flip(0), vocab_start=lo, vocab_size=V, **common)
    mask = torch.arange(N) % 3 != 0
    out["at"] = _shard_grad(lambda x: logprob_entropy_at(
        x.view(1, N, -1), targets.view(1, N), mask.view(1, N), entropy_grad=True, **common),
        even64, w_logp.view(1, N), w_ent.view(1, N))
    empty, _ = vocab_parallel_logprob_entropy(even32[:0], targets[:0], **common)  # collectives still meet
    out["empty"] = tuple(empty.shape)
    # The fused path: this rank's rows of the output layer's weight, the same hidden states on every rank
    hidden, weight = _hidden_inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight[cols].clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprob_entropy_from_hidden(h, w, targets, entropy_grad=True, chunk_size=5, **common)
    ((w_logp * logp) + (w_ent * ent)).sum().backward()
    out["fused"] = {"logp": logp.detach(), "ent": ent.detach(), "d_hidden_share": h.grad, "d_weight": w.grad}
    return out


def _hidden_inputs(hidden_size=16):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(N, hidden_size, generator=gen, dtype=torch.float64),
            torch.randn(V, hidden_size, generator=gen, dtype=torch.float64) * 0.6)


def _fused_reference():
    logits, other, targets, w_logp, w_ent = _inputs()
    hidden, weight = _hidden_inputs()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logsm = torch.log_softmax(h @ w.t() / TEMPERATURE, -1)
    logp = logsm.gather(1, targets[:, None])[:, 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    (w_logp * logp + w_ent * ent).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _reference(logits, other, targets, w_logp, w_ent, mask=None):
    leaf = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(leaf / TEMPERATURE, -1)
    logp = logsm.gather(1, targets[:, None])[:, 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    keep = torch.ones(N, dtype=torch.float64) if mask is None else mask.double()
    ((w_logp * logp + w_ent * ent) * keep).sum().backward()
    logq = torch.log_softmax(other / TEMPERATURE, -1)
    kl = (logsm.exp() * (logsm - logq)).sum(-1).detach()
    return logp.detach() * keep, ent.detach() * keep, leaf.grad, kl


def _check(out, ref, cols, tol):
    logp, ent, grad = ref[:3]
    torch.testing.assert_close(out["logp"].double(), logp, rtol=tol, atol=tol)
    torch.testing.assert_close(out["ent"].double(), ent, rtol=tol, atol=tol)
    torch.testing.assert_close(out["grad"].double(), grad[:, cols], rtol=tol, atol=tol)


def test_shards_match_the_full_vocabulary_at_tp2_and_tp4():
    # uneven bounds over V + 3 columns: the last shard holds the 3 padding columns (only them at TP=2)
    bounds_by_tp = {2: [0, V, V + 3], 4: [0, 20, 21, 40, V + 3]}
    results = run_gloo(_worker, 4, bounds_by_tp, timeout=90)
    for tp, bounds in bounds_by_tp.items():
        _check_tp([r[tp] for r in results], tp, bounds)


def _check_tp(results, world_size, bounds):
    logits, other, targets, w_logp, w_ent = _inputs()
    full = _reference(logits, other, targets, w_logp, w_ent)
    logp_only = _reference(logits, other, targets, w_logp, torch.zeros(N, dtype=torch.float64))
    mask = torch.arange(N) % 3 != 0
    at = _reference(logits, other, targets, w_logp, w_ent, mask)
    flip_kl = _reference(logits, logits.flip(0), targets, w_logp, w_ent)[3]
    v_local = V // world_size
    for global_rank, out in enumerate(results):
        rank = global_rank % world_size
        cols = slice(rank * v_local, (rank + 1) * v_local)
        _check(out["f64"], full, cols, 1e-10)
        _check(out["f32"], full, cols, 1e-6)
        assert out["f32"]["logp"].dtype == torch.float32
        torch.testing.assert_close(out["f64_kl"], full[3], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["f32_kl"].double(), full[3], rtol=1e-6, atol=1e-6)
        _check(out["f32_no_ent_grad"], (full[0], full[1], logp_only[2]), cols, 1e-6)
        lo, hi = bounds[rank], bounds[rank + 1]
        grad = out["uneven"]["grad"]
        _check({**out["uneven"], "grad": grad[:, : max(0, min(hi, V) - lo)]}, full, slice(lo, min(hi, V)), 1e-10)
        assert (grad[:, max(0, V - lo):] == 0).all()
        torch.testing.assert_close(out["uneven_kl"], flip_kl, rtol=1e-9, atol=1e-10)
        at_out = {k: v.reshape(N, -1).squeeze(-1) if k != "grad" else v for k, v in out["at"].items()}
        _check(at_out, at, cols, 1e-10)
        assert out["empty"] == (0,)
    # fused: values on every rank, the weight's gradient per shard, the hidden states' summed over the group
    logp, ent, d_hidden, d_weight = _fused_reference()
    for start in range(0, len(results), world_size):
        group = results[start:start + world_size]
        for rank, out in enumerate(group):
            fused = out["fused"]
            torch.testing.assert_close(fused["logp"], logp, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(fused["ent"], ent, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(fused["d_weight"], d_weight[rank * v_local:(rank + 1) * v_local],
                                       rtol=1e-10, atol=1e-10)
        summed = torch.stack([out["fused"]["d_hidden_share"] for out in group]).sum(0)
        torch.testing.assert_close(summed, d_hidden, rtol=1e-10, atol=1e-10)
