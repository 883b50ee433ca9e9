"""Vocab-parallel log-prob / entropy / full KL at TP=1 against plain log_softmax on the same logits."""

import pytest
import torch

from liteppo_mcore.models.logprob import (
    logprob_entropy_at,
    vocab_parallel_full_kl,
    vocab_parallel_logprob_entropy,
)


def _reference(logits, targets, temperature):
    """log p(target) and -(p log p).sum() of softmax(logits / T), straight from torch."""
    logsm = torch.log_softmax(logits / temperature, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logsm.exp() * logsm).sum(-1)


def _case(n=37, v=53, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    w_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    return logits, targets, w_logp, w_ent


def _grads(fn, logits, w_logp, w_ent):
    """(logp, entropy, d(w_logp.logp + w_ent.entropy)/d logits) of fn(leaf)."""
    leaf = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(leaf)
    loss = (w_logp.to(logp.dtype) * logp).sum()
    if ent is not None and ent.requires_grad:
        loss = loss + (w_ent.to(ent.dtype) * ent).sum()
    loss.backward()
    return logp.detach(), ent.detach() if ent is not None else None, leaf.grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 36, 37, 100])
def test_forward_and_gradient_match_log_softmax(temperature, chunk_size):
    logits, targets, w_logp, w_ent = _case()
    ours = _grads(lambda x: vocab_parallel_logprob_entropy(
        x, targets, temperature=temperature, entropy_grad=True, chunk_size=chunk_size), logits, w_logp, w_ent)
    ref = _grads(lambda x: _reference(x.double(), targets, temperature), logits, w_logp, w_ent)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours[2], ref[2].float(), rtol=1e-5, atol=1e-6)


def test_entropy_grad_off_differentiates_logp_only_and_builds_no_entropy_graph():
    logits, targets, w_logp, w_ent = _case()
    leaf = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprob_entropy(leaf, targets, temperature=0.7)
    assert logp.requires_grad and not ent.requires_grad and ent.grad_fn is None
    # entropy is still the right number, only without a graph
    ref_logp, ref_ent = _reference(logits.double(), targets, 0.7)
    torch.testing.assert_close(ent, ref_ent.float(), rtol=1e-5, atol=2e-6)
    ours = _grads(lambda x: vocab_parallel_logprob_entropy(x, targets, temperature=0.7), logits, w_logp, w_ent)
    ref = _grads(lambda x: (_reference(x.double(), targets, 0.7)[0], None), logits, w_logp, w_ent)
    torch.testing.assert_close(ours[2], ref[2].float(), rtol=1e-5, atol=1e-6)
    # the backward keeps no per-token entropy for its own use
    assert len(logp.grad_fn.saved_tensors) == 4 and logp.grad_fn.saved_tensors[3] is None
    none_logp, none_ent = vocab_parallel_logprob_entropy(logits, targets, temperature=0.7, compute_entropy=False)
    assert none_ent is None
    torch.testing.assert_close(none_logp, logp.detach())


def test_entropy_alone_as_loss():
    logits, targets, _, w_ent = _case(seed=3)
    zero = torch.zeros_like(w_ent)
    leaf = logits.clone().requires_grad_(True)
    _, ent = vocab_parallel_logprob_entropy(leaf, targets, temperature=0.7, entropy_grad=True)
    (w_ent.float() * ent).sum().backward()
    ref = _grads(lambda x: _reference(x.double(), targets, 0.7), logits, zero, w_ent)
    torch.testing.assert_close(leaf.grad, ref[2].float(), rtol=1e-5, atol=1e-6)


def test_bf16_logits_against_fp32_reference_on_the_same_values():
    logits, targets, w_logp, w_ent = _case(n=64, v=300, dtype=torch.bfloat16)
    ours = _grads(lambda x: vocab_parallel_logprob_entropy(
        x, targets, temperature=0.7, entropy_grad=True, chunk_size=16), logits, w_logp, w_ent)
    ref = _grads(lambda x: _reference(x.double(), targets, 0.7), logits.double(), w_logp, w_ent)
    # The values are upcast before any arithmetic: forward is fp32-exact on the bf16 inputs.
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=1e-5)
    # The gradient is stored in bf16 (8 significant bits): relative 2^-8 of its size.
    assert ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[2].float(), ref[2].float(), rtol=2 ** -8, atol=1e-4)


def test_large_logits_and_near_deterministic_rows_keep_precision():
    logits, targets, w_logp, w_ent = _case(n=20, v=40, scale=1.0, seed=5)
    logits = logits * 200 + 1000  # fp32 exp would overflow without the shift; entropies near 0
    ours = _grads(lambda x: vocab_parallel_logprob_entropy(x, targets, entropy_grad=True), logits, w_logp, w_ent)
    ref = _grads(lambda x: _reference(x.double(), targets, 1.0), logits, w_logp, w_ent)
    assert torch.isfinite(ours[0]).all() and (ours[1] >= 0).all()
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=1e-4)
    # entropies down to 1e-7 here: fp32 resolves them to its absolute precision, like fp32 log_softmax
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-4, atol=1e-7)
    # z - log Z near 1000 carries fp32's absolute rounding there (6e-5) into p, as in fp32 log_softmax
    torch.testing.assert_close(ours[2], ref[2].float(), rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_gradcheck_float64(entropy_grad):
    logits, targets, w_logp, w_ent = _case(n=6, v=9, dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)

    def combined(x):
        logp, ent = vocab_parallel_logprob_entropy(
            x, targets, temperature=0.7, entropy_grad=entropy_grad, chunk_size=4)
        return logp, 0.3 * logp - 1.7 * ent if entropy_grad else logp * 2.0

    assert torch.autograd.gradcheck(combined, (leaf,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_full_kl_matches_direct_computation():
    p, _, _, _ = _case(n=33, v=47, seed=1)
    q, _, _, _ = _case(n=33, v=47, seed=2)
    for temperature in (1.0, 0.7):
        lp = torch.log_softmax(p.double() / temperature, -1)
        lq = torch.log_softmax(q.double() / temperature, -1)
        expected = (lp.exp() * (lp - lq)).sum(-1)
        for chunk_size in (None, 1, 10):
            kl = vocab_parallel_full_kl(p, q, temperature=temperature, chunk_size=chunk_size)
            assert kl.dtype == torch.float32 and not kl.requires_grad
            torch.testing.assert_close(kl, expected.float(), rtol=1e-5, atol=1e-6)
    assert vocab_parallel_full_kl(p, p).abs().max() < 1e-6
    # float64 logits are computed in float64, so a tiny KL is resolved
    q_close = p.double() + 1e-4 * q.double()
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q_close, -1)
    expected = (lp.exp() * (lp - lq)).sum(-1)
    kl64 = vocab_parallel_full_kl(p.double(), q_close, chunk_size=4)
    assert kl64.dtype == torch.float64
    torch.testing.assert_close(kl64, expected, rtol=1e-6, atol=1e-15)
    grad_leaf = p.clone().requires_grad_(True)
    assert not vocab_parallel_full_kl(grad_leaf, q).requires_grad


def test_positions_helper_selects_and_scatters_back():
    gen = torch.Generator().manual_seed(4)
    b, s, v = 3, 7, 29
    logits_sbv = torch.randn(s, b, v, generator=gen)  # megatron's [S, B, V] layout seen as [B, S, V]
    logits = logits_sbv.transpose(0, 1)
    targets = torch.randint(0, v, (b, s), generator=gen)
    mask = torch.rand(b, s, generator=gen) > 0.4
    mask[0, 0], mask[1, 1] = True, False
    leaf = logits.detach().clone().requires_grad_(True)
    logp, ent = logprob_entropy_at(leaf, targets, mask, temperature=0.7, entropy_grad=True, chunk_size=2)
    assert logp.shape == (b, s) and ent.shape == (b, s)
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
    ref_logp, ref_ent = _reference(logits.double(), targets, 0.7)
    torch.testing.assert_close(logp[mask], ref_logp[mask].float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ent[mask], ref_ent[mask].float(), rtol=1e-5, atol=2e-6)
    (logp.sum() - 0.5 * ent.sum()).backward()
    ref_leaf = logits.double().clone().requires_grad_(True)
    r_logp, r_ent = _reference(ref_leaf, targets, 0.7)
    ((r_logp * mask).sum() - 0.5 * (r_ent * mask).sum()).backward()
    assert (leaf.grad[~mask] == 0).all()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad.float(), rtol=1e-5, atol=1e-6)


def test_inplace_backward_writes_gradient_into_the_logits():
    logits, targets, w_logp, w_ent = _case()
    rows = logits.clone().requires_grad_(True)
    work = rows * 1.0  # a private intermediate, as after a selection
    logp, ent = vocab_parallel_logprob_entropy(work, targets, entropy_grad=True, inplace_backward=True)
    captured = {}

    def remember(grad):
        captured["ptr"] = grad.data_ptr()

    work.register_hook(remember)
    ((w_logp.float() * logp).sum() + (w_ent.float() * ent).sum()).backward()
    assert captured["ptr"] == work.data_ptr()
    ref = _grads(lambda x: _reference(x.double(), targets, 1.0), logits, w_logp, w_ent)
    torch.testing.assert_close(rows.grad, ref[2].float(), rtol=1e-5, atol=1e-6)


def test_vocab_padding_is_outside_the_distribution():
    logits, targets, w_logp, w_ent = _case(v=40)
    padded = torch.cat([logits, torch.full((logits.shape[0], 8), 5.0)], dim=1)  # 8 padding columns
    ours = _grads(lambda x: vocab_parallel_logprob_entropy(x, targets, vocab_size=40, entropy_grad=True),
                  padded, w_logp, w_ent)
    ref = _grads(lambda x: _reference(x.double(), targets, 1.0), logits, w_logp, w_ent)
    torch.testing.assert_close(ours[0], ref[0].float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours[1], ref[1].float(), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(ours[2][:, :40], ref[2].float(), rtol=1e-5, atol=1e-6)
    assert (ours[2][:, 40:] == 0).all()
    q = padded.flip(0)
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(logits.flip(0).double(), -1)
    torch.testing.assert_close(vocab_parallel_full_kl(padded, q, vocab_size=40),
                               (lp.exp() * (lp - lq)).sum(-1).float(), rtol=1e-5, atol=1e-6)


def test_no_rows_int32_targets_and_bad_arguments():
    logp, ent = vocab_parallel_logprob_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and ent.shape == (0,)
    assert vocab_parallel_full_kl(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)
    logits, targets, _, _ = _case()
    torch.testing.assert_close(vocab_parallel_logprob_entropy(logits, targets.int())[0],
                               vocab_parallel_logprob_entropy(logits, targets)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprob_entropy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), chunk_size=0)


# ---------------------------------------------------------------------------------------------------
# The fused path: log-probs and entropy straight from the hidden states and the output layer's weight


def _fused_case(n=41, h=24, v=50, padded=56, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(padded, h, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    w_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, w_logp, w_ent


def _hidden_and_weight_grads(fn, hidden, weight, w_logp, w_ent):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, ent = fn(h, w)
    loss = (w_logp.to(logp.dtype) * logp).sum()
    if ent is not None and ent.requires_grad:
        loss = loss + (w_ent.to(ent.dtype) * ent).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_fused_equals_the_unfused_path_in_values_and_gradients(entropy_grad, chunk_size):
    from liteppo_mcore.models.logprob import vocab_parallel_logprob_entropy_from_hidden

    hidden, weight, targets, w_logp, w_ent = _fused_case()
    common = dict(temperature=0.7, vocab_size=50, entropy_grad=entropy_grad)
    fused = _hidden_and_weight_grads(lambda h, w: vocab_parallel_logprob_entropy_from_hidden(
        h, w, targets, chunk_size=chunk_size, **common), hidden, weight, w_logp, w_ent)
    unfused = _hidden_and_weight_grads(lambda h, w: vocab_parallel_logprob_entropy(
        h @ w.t(), targets, **common), hidden, weight, w_logp, w_ent)
    # to 1e-6 of each quantity's largest magnitude: fp32 matmuls of one row and of 41 rows sum in other orders
    for got, want, name in zip(fused, unfused, ("logp", "entropy", "d hidden", "d weight")):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * max(1.0, float(want.abs().max())), msg=name)
    assert fused[3][50:].abs().max() == 0  # vocabulary padding rows of the weight get no gradient


def _inside(event, name: str) -> bool:
    """Whether a profiler event runs inside another of that name (the strict mode's dispatch re-enters)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def test_fused_computes_the_logits_of_a_single_chunk_once():
    """Rows that fit one chunk: the backward reuses the forward's logits; more chunks: each is recomputed.
    (The logits are the GEMMs `[rows, H] x [H, V]`; the gradients' are `[rows, V] x [V, H]` and an addmm.)"""
    from torch.profiler import ProfilerActivity, profile

    from liteppo_mcore.models.logprob import vocab_parallel_logprob_entropy_from_hidden

    hidden, weight, targets, w_logp, w_ent = _fused_case()  # 41 rows
    h = hidden.shape[1]
    for chunk_size, logits_matmuls in ((None, 1), (41, 1), (7, 2 * 6)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:  # the backward too
            _hidden_and_weight_grads(lambda h, w, c=chunk_size: vocab_parallel_logprob_entropy_from_hidden(
                h, w, targets, chunk_size=c), hidden, weight, w_logp, w_ent)
        logits_gemms = [e for e in prof.events() if e.name == "aten::mm" and e.input_shapes[0][1:] == [h]
                        and e.input_shapes[1][:1] == [h] and not _inside(e, "aten::mm")]
        assert len(logits_gemms) == logits_matmuls, chunk_size
        # one chunk, one shard, no entropy gradient: the one fused log-softmax pass (_one_pass_forward)
        one_pass = sum(e.count for e in prof.key_averages() if e.key == "aten::log_softmax")
        assert one_pass == (1 if chunk_size != 7 else 0), chunk_size


def test_fused_float64_gradcheck_and_edge_cases():
    from liteppo_mcore.models.logprob import vocab_parallel_logprob_entropy_from_hidden

    hidden, weight, targets, _, _ = _fused_case(n=5, h=4, v=6, padded=8, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def fn(h, w):
        logp, ent = vocab_parallel_logprob_entropy_from_hidden(h, w, targets, vocab_size=6, entropy_grad=True,
                                                               chunk_size=2, temperature=1.3)
        return logp, ent

    assert torch.autograd.gradcheck(fn, (h, w))
    empty_logp, empty_ent = vocab_parallel_logprob_entropy_from_hidden(
        hidden[:0], weight, targets[:0], vocab_size=6)
    assert empty_logp.shape == (0,) and empty_ent.shape == (0,)
    logp, ent = vocab_parallel_logprob_entropy_from_hidden(hidden, weight, targets, compute_entropy=False)
    assert ent is None and logp.shape == (5,)
    with pytest.raises(ValueError, match="must share H"):
        vocab_parallel_logprob_entropy_from_hidden(hidden, weight[:, :3], targets)
