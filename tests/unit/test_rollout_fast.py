"""The `fast` engine in one process, against transformers on the same weights (float32, CPU):
greedy output equals the `hf` engine's, logits at every cached decode step equal transformers' full
forward, sampled log-probs equal a recomputation at the temperature over the full vocabulary, seeds
reproduce, stop tokens are kept, `n` samples per prompt; qwen2 (qkv bias, tied), qwen3 (q/k norm) and
llama (untied, Llama 3 rope scaling). The CUDA-graph path is checked against eager only on a GPU."""

import pytest
import torch

from liteppo_mcore.models.shapes import ModelShape
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import SamplingParams

SINGLE = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 3]]  # different lengths: left padding is exercised
NEVER = 10_000  # a stop id outside the vocabulary: generation runs to max_new_tokens
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = ("qwen2", "qwen3", "llama")


def _shape(family: str) -> ModelShape:
    return ModelShape(family=family, num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, head_dim=16 if family == "qwen3" else 8, vocab_size=64,
                      max_position_embeddings=96, rope_theta=10000.0, norm_epsilon=1e-6,
                      tie_word_embeddings=family != "llama", rope_scaling=LLAMA3 if family == "llama" else None)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    """(fast engine, hf engine, transformers reference) sharing one set of random weights."""
    from liteppo_mcore.rollout.fast_engine import FastEngine
    from liteppo_mcore.rollout.hf_engine import HFEngine, build_hf_model

    shape = _shape(request.param)
    reference = build_hf_model(shape, torch.float32, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in reference.named_parameters():
            p.normal_(0.0, 0.3)
    stream = [(k, v.clone()) for k, v in reference.state_dict().items()
              if not (shape.tie_word_embeddings and k == "lm_head.weight")]
    fast = FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cpu", pad_token_id=0)
    fast.update_weights([stream[:4], stream[4:]])
    hf = HFEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cpu", pad_token_id=0)
    hf.update_weights([stream])
    return fast, hf, reference


def _recomputed(reference, prompt, gen, temperature):
    """log_softmax(logits / T) of transformers' forward on the unpadded sequence, at the sampled tokens."""
    seq = torch.tensor([list(prompt) + gen.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(reference(seq).logits[0].float() / temperature, dim=-1)
    return logp[len(prompt) - 1: -1].gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)


def test_greedy_equals_hf_engine(setup):
    fast, hf, _ = setup
    params = SamplingParams(temperature=0.5, max_new_tokens=10, greedy=True, stop_token_ids=(NEVER,))
    mine, theirs = fast.generate(PROMPTS, params), hf.generate(PROMPTS, params)
    for a, b in zip(mine, theirs):
        assert a[0].token_ids == b[0].token_ids and a[0].finish_reason == b[0].finish_reason == "length"
        assert max(abs(x - y) for x, y in zip(a[0].logprobs, b[0].logprobs)) <= 1e-5
    for prompt, gens in zip(PROMPTS, mine):  # padding invariance: alone equals in the batch
        assert fast.generate([prompt], params)[0][0].token_ids == gens[0].token_ids


def test_logits_at_every_decode_step_equal_transformers(setup):
    from liteppo_mcore.rollout.fast_decoder import pack_rows

    fast, _, reference = setup
    dec = fast.decoder
    ids, starts = pack_rows(PROMPTS, 0, torch.device("cpu"))
    width, steps = ids.shape[1], 8
    cache = dec.new_cache(len(PROMPTS), width + steps)
    seqs = [list(p) for p in PROMPTS]
    with torch.no_grad():
        logits = dec.prefill(ids, starts, cache)
        for t in range(steps):
            for i, seq in enumerate(seqs):
                want = reference(torch.tensor([seq])).logits[0, -1]
                assert (logits[i] - want).abs().max() <= 1e-4, (i, t)
            tokens = logits.argmax(-1)
            for seq, tok in zip(seqs, tokens.tolist()):
                seq.append(tok)
            logits = dec.decode_step(tokens, width - starts + t, starts, cache)


@pytest.mark.parametrize("top_k", [-1, 5])
def test_sampled_logprobs_are_raw_full_vocab(setup, top_k):
    fast, _, reference = setup
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=top_k, max_new_tokens=8, n=2, seed=3,
                            stop_token_ids=(NEVER,))
    out = fast.generate(PROMPTS, params)
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, gens in zip(PROMPTS, out):
        for gen in gens:
            assert len(gen.token_ids) == len(gen.logprobs) == 8
            want = _recomputed(reference, prompt, gen, 0.7)
            # a renormalized (top-p/top-k) or padded log-prob would differ by far more than this
            assert (want - torch.tensor(gen.logprobs)).abs().max() <= 1e-4


def test_seed_reproduces_samples_and_n_samples_differ(setup):
    fast, _, _ = setup
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=11, stop_token_ids=(NEVER,))
    first = [[g.token_ids for g in gs] for gs in fast.generate(PROMPTS, params)]
    again = [[g.token_ids for g in gs] for gs in fast.generate(PROMPTS, params)]
    other = [[g.token_ids for g in gs] for gs in fast.generate(PROMPTS, SamplingParams(
        temperature=1.0, max_new_tokens=8, n=3, seed=12, stop_token_ids=(NEVER,)))]
    assert first == again and first != other
    assert all(len(gs) == 3 and len({tuple(t) for t in gs}) > 1 for gs in first)


def test_stop_token_kept_and_finish_reasons(setup):
    fast, _, _ = setup
    free = fast.generate(PROMPTS, SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=(NEVER,)))
    stop = free[0][0].token_ids[3]  # a token that row 0 produces at its 4th step
    params = SamplingParams(max_new_tokens=10, greedy=True, stop_token_ids=(stop,))
    for full, cut in zip(free, fast.generate(PROMPTS, params)):
        tokens, gen = full[0].token_ids, cut[0]
        if stop in tokens:
            k = tokens.index(stop)
            assert gen.token_ids == tokens[: k + 1] and gen.finish_reason == "stop"
            assert gen.logprobs == pytest.approx(full[0].logprobs[: k + 1], abs=1e-6)
        else:
            assert gen.token_ids == tokens and gen.finish_reason == "length"
    assert fast.generate(PROMPTS, params)[0][0].finish_reason == "stop"


def test_engine_defaults_stop_tokens_and_errors():
    from liteppo_mcore.rollout.fast_engine import FastEngine

    shape = _shape("qwen2")
    engine = FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cpu")
    assert engine.name == "fast" and engine.needs_weight_sync and not engine.use_cuda_graphs
    with pytest.raises(KeyError, match="lacked"):
        engine.update_weights([[("model.norm.weight", torch.ones(32))]])
    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights([[("model.layers.9.mlp.up_proj.weight", torch.ones(48, 32))]])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([[("model.norm.weight", torch.ones(31))]])
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([[1]], SamplingParams(top_k=0))
    with pytest.raises(ValueError, match="positions"):
        engine.generate([[1] * 90], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="CUDA graphs"):
        FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cpu", use_cuda_graphs=True)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.wake()
    gen = engine.generate([[1, 4]], SamplingParams(max_new_tokens=40, greedy=True))[0][0]  # zero weights
    assert gen.token_ids == [0] * 40 and gen.finish_reason == "length"  # argmax of equal logits, EOS 2 not hit


def test_sampler_draws_from_the_nucleus_only():
    from liteppo_mcore.rollout.fast_decoder import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_next(logits, 1.0, -1, 0.8, False, g)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03  # renormalized inside the nucleus for the draw
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.3]))[tokens])  # log-probs are not
    tokens, _ = sample_next(logits, 1.0, 1, 1.0, False, g)
    assert tokens.unique().tolist() == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_engine_equals_eager_engine():
    from liteppo_mcore.rollout.fast_engine import FastEngine

    shape = _shape("qwen2")
    engines = [FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cuda",
                          use_cuda_graphs=g) for g in (False, True)]
    torch.manual_seed(0)
    stream = [(k, torch.randn(v.shape) * 0.3) for k, v in engines[0].decoder.params.items()]
    for e in engines:
        e.update_weights([stream])
    greedy = SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True, stop_token_ids=(NEVER,))
    eager, graphed = (e.generate(PROMPTS, greedy) for e in engines)  # 3 rows: the graph runs a bucket of 4
    for a, b in zip(eager, graphed):
        assert a[0].token_ids == b[0].token_ids
        assert max(abs(p - q) for p, q in zip(a[0].logprobs, b[0].logprobs)) <= 1e-4
    sampled = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, n=2, seed=5, stop_token_ids=(NEVER,))
    first, again = (engines[1].generate(PROMPTS, sampled) for _ in range(2))  # graphs replayed, same seed
    assert [[g.token_ids for g in gs] for gs in first] == [[g.token_ids for g in gs] for gs in again]
    engines[1].sleep()
    engines[1].wake()  # weights moved away and back, cache and graphs rebuilt
    assert engines[1].generate(PROMPTS, greedy)[0][0].token_ids == graphed[0][0].token_ids
