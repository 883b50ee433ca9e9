"""The `fast` engine in one process, against transformers on the same weights (float32, CPU):
greedy output equals the `hf` engine's, logits at every cached decode step equal transformers' full
forward, sampled log-probs equal a recomputation at the temperature over the full vocabulary, seeds
reproduce, stop tokens are kept, `n` samples per prompt; qwen2 (qkv bias, tied), qwen3 (q/k norm) and
llama (untied, Llama 3 rope scaling). The CUDA-graph path runs against eager on a GPU; on the CPU its
logic (capture arguments, buckets bounded by max_batch_size, which graphs and cache survive sleep /
wake) runs with stand-ins for torch.cuda's graph API that replay the captured step eagerly.

The engines take their own device (`compute_device()`: the CPU, or cuda:0 with the data on the CPU
under the strict virtual-device mode, which then checks their placements); on a GPU machine these
CPU-tolerance checks keep them on the CPU."""

import contextlib
import inspect
import types

import pytest
import torch

from liteppo_mcore.config import choices
from liteppo_mcore.models.shapes import ModelShape
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import SamplingParams

SINGLE = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 3]]  # different lengths: left padding is exercised
NEVER = 10_000  # a stop id outside the vocabulary: generation runs to max_new_tokens
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = choices.MODEL_FAMILIES
DEVICE = "cpu" if torch.cuda.is_available() else None  # None: the engine's own (compute_device())


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
    fast = FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device=DEVICE, pad_token_id=0)
    fast.update_weights([stream[:4], stream[4:]])
    hf = HFEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device=DEVICE, pad_token_id=0)
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
    ids, starts = pack_rows(PROMPTS, 0, fast.device)
    width, steps = ids.shape[1], 8
    cache = dec.new_cache(len(PROMPTS), width + steps)
    seqs = [list(p) for p in PROMPTS]
    with torch.no_grad():
        logits = dec.prefill(ids, starts, cache)
        for t in range(steps):
            for i, seq in enumerate(seqs):
                want = reference(torch.tensor([seq])).logits[0, -1]
                assert (logits[i].cpu() - want).abs().max() <= 1e-4, (i, t)
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
    engine = FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device=DEVICE)
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
    with pytest.raises(ValueError, match="max_batch_size"):
        FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cpu", max_batch_size=0)
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
    graphs = dict(engines[1]._graphs)
    assert engines[1].keeps_graphs()  # auto: a tiny model's weights and cache fit the GPU many times over
    engines[1].sleep()
    engines[1].wake()  # nothing moved: the graphs of the first call replay
    assert engines[1]._graphs == graphs
    assert engines[1].generate(PROMPTS, greedy)[0][0].token_ids == graphed[0][0].token_ids
    engines[1].keep_graphs = False
    engines[1].sleep()
    assert engines[1]._graphs == {} and engines[1]._cache is None
    engines[1].wake()  # weights moved away and back, cache and graphs rebuilt
    assert engines[1].generate(PROMPTS, greedy)[0][0].token_ids == graphed[0][0].token_ids
    bounded = FastEngine(shape, SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cuda", max_batch_size=3)
    bounded.update_weights([stream])
    tokens = [[g.token_ids for g in gs] for gs in bounded.generate(PROMPTS + [[1, 4]], sampled)]  # 8 rows: 3+3+2
    assert sorted(bounded._graphs) == [2, 3] and bounded._cache.shape[2] == 3
    assert all(len(t) == 12 for ts in tokens for t in ts)


# ---------------------------------------------------------------------------------------------------
# The CUDA-graph logic on the CPU: torch.cuda's graph API replaced by stand-ins. A captured step is
# recorded with the very tensors it was captured on (static inputs, cache, output) and replayed by
# running it again into the captured output, so a graph that outlived its cache or inputs gives wrong
# tokens here as it would on a GPU.


@pytest.fixture
def fake_cuda(monkeypatch):
    from liteppo_mcore.rollout.fast_decoder import CompactDecoder

    assert "capture_error_mode" in inspect.signature(torch.cuda.graph.__init__).parameters  # the real API
    log = types.SimpleNamespace(captures=[], replays=0, pools=[], warmups=0)
    state = {"graph": None, "stream": None}
    real_step = CompactDecoder.decode_step

    class Stream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def stream(s):
        state["stream"] = s
        try:
            yield
        finally:
            state["stream"] = None

    class CUDAGraph:
        def __init__(self):
            self.calls = []

        def replay(self):
            log.replays += 1
            for args, out in self.calls:
                out.copy_(real_step(*args))

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        log.captures.append({"graph": cuda_graph, "pool": pool, "capture_error_mode": capture_error_mode})
        state["graph"] = cuda_graph
        try:
            yield
        finally:
            state["graph"] = None

    def decode_step(self, tokens, positions, starts, cache):
        out = real_step(self, tokens, positions, starts, cache)
        if state["graph"] is not None:
            state["graph"].calls.append(((self, tokens, positions, starts, cache), out))
        elif state["stream"] is not None:
            log.warmups += 1
        return out

    def pool_handle():
        log.pools.append(object())
        return log.pools[-1]

    monkeypatch.setattr(CompactDecoder, "decode_step", decode_step)
    for name, value in (("Stream", Stream), ("stream", stream), ("current_stream", lambda device=None: Stream(device)),
                        ("CUDAGraph", CUDAGraph), ("graph", graph), ("graph_pool_handle", pool_handle)):
        monkeypatch.setattr(torch.cuda, name, value)
    return log


def _loaded(graphs: bool, **kwargs):
    """A qwen2 fast engine with fixed random weights; `graphs`: the path use_cuda_graphs selects on a GPU."""
    from liteppo_mcore.rollout.fast_engine import FastEngine

    engine = FastEngine(_shape("qwen2"), SINGLE, eos_token_ids=[2], dtype=torch.float32, device=DEVICE,
                        pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    engine.update_weights([[(k, torch.randn(v.shape) * 0.3) for k, v in engine.decoder.params.items()]])
    engine.use_cuda_graphs = graphs
    return engine


GREEDY = SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True, stop_token_ids=(NEVER,))


def _same(a, b):
    for x, y in zip(a, b):
        assert [g.token_ids for g in x] == [g.token_ids for g in y]
        assert max(abs(p - q) for g, h in zip(x, y) for p, q in zip(g.logprobs, h.logprobs)) <= 1e-5


def test_graph_capture_arguments_and_static_buffers(fake_cuda):
    from liteppo_mcore.rollout.fast_decoder import pack_rows
    from liteppo_mcore.rollout.fast_engine import GraphedDecodeStep

    dec = _loaded(False).decoder
    ids, starts = pack_rows(PROMPTS + [[0]], 0, dec.device)
    cache = dec.new_cache(4, 64)
    step = GraphedDecodeStep(dec, cache, 4, pool="the pool")
    assert [(c["pool"], c["capture_error_mode"]) for c in fake_cuda.captures] == [("the pool", "thread_local")]
    assert fake_cuda.warmups == 2 and step.cache is cache and step.batch == 4  # the graph keeps its cache alive
    eager_cache = cache.clone()
    with torch.no_grad():
        logits = dec.prefill(ids, starts, cache)
        dec.prefill(ids, starts, eager_cache)
        for t in range(3):
            tokens, positions = logits.argmax(-1), ids.shape[1] - starts + t
            want = dec.decode_step(tokens, positions, starts, eager_cache)
            logits = step(tokens, positions, starts)
            assert logits is step.logits and torch.equal(logits, want)  # inputs copied into the static buffers
    assert fake_cuda.replays == 3 and len(fake_cuda.captures) == 1


def test_graphed_engine_equals_eager_and_reuses_its_graphs(fake_cuda):
    eager, graphed = _loaded(False), _loaded(True)
    want = eager.generate(PROMPTS, GREEDY)
    _same(graphed.generate(PROMPTS, GREEDY), want)  # 3 rows run as a bucket of 4
    assert sorted(graphed._graphs) == [4] and len(fake_cuda.captures) == 1 and len(fake_cuda.pools) == 1
    replays = fake_cuda.replays
    _same(graphed.generate(PROMPTS, GREEDY), want)
    assert len(fake_cuda.captures) == 1 and fake_cuda.replays > replays  # replayed, not captured again


def test_rows_and_buckets_are_bounded_by_max_batch_size(fake_cuda):
    from liteppo_mcore.rollout.fast_engine import bucket_for

    assert [bucket_for(r) for r in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert [bucket_for(r, 6) for r in (1, 3, 5, 6)] == [1, 4, 6, 6]
    prompts = PROMPTS + [[1, 4]]
    sample = SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True, n=2, stop_token_ids=(NEVER,))
    eager = _loaded(False, max_batch_size=3).generate(prompts, sample)
    graphed = _loaded(True, max_batch_size=3, max_sequence_length=40)
    _same(graphed.generate(prompts, sample), eager)  # 8 rows: chunks of 3, 3 and 2
    assert sorted(graphed._graphs) == [2, 3] and len(fake_cuda.captures) == 2
    cache, graphs = graphed._cache, dict(graphed._graphs)
    assert cache.shape[2] == 3 and cache.shape[4] == 64  # B_max x L: 39 slots for 40 tokens, rounded up to 64
    longer = [[1] + list(range(3, 20))]  # 18 + 12 tokens: within the size it was allocated for
    graphed.generate(longer, GREEDY)
    assert graphed._cache is cache and all(graphed._graphs[b] is g for b, g in graphs.items())
    assert sorted(graphed._graphs) == [1, 2, 3]


@pytest.mark.parametrize("keep", [True, False])
def test_sleep_keeps_cache_and_graphs_together_or_drops_both(fake_cuda, keep):
    eager, graphed = _loaded(False), _loaded(True, keep_graphs=keep)
    want = eager.generate(PROMPTS, GREEDY)
    _same(graphed.generate(PROMPTS, GREEDY), want)
    graphs, cache, store = dict(graphed._graphs), graphed._cache, dict(graphed.decoder.store)
    assert graphed.keeps_graphs() is keep
    graphed.sleep()
    if keep:  # the graphs point at the weights, the rope tables and the cache: all stay where they are
        assert graphed._graphs == graphs and graphed._cache is cache and not graphed._parked
    else:
        assert graphed._graphs == {} and graphed._cache is None and graphed._pool is None
        assert graphed._parked == (graphed.device.type == "cuda")  # weights on the CPU while the trainer trains
    graphed.wake()
    if keep:
        assert all(graphed.decoder.store[k] is v for k, v in store.items())
    torch.manual_seed(1)  # an update while the graphs are kept: copied in place, the graphs see it
    update = [[(k, torch.randn(v.shape) * 0.3) for k, v in eager.decoder.params.items()]]
    for e in (eager, graphed):
        e.update_weights(update)
    _same(graphed.generate(PROMPTS, GREEDY), eager.generate(PROMPTS, GREEDY))
    assert len(fake_cuda.captures) == (1 if keep else 2)


def test_keep_graphs_rule():
    from liteppo_mcore.rollout.fast_engine import KEEP_GRAPHS_FRACTION, keeps_graphs_across_sleep

    assert KEEP_GRAPHS_FRACTION == 0.25
    assert keeps_graphs_across_sleep(None, 25, 100) and not keeps_graphs_across_sleep(None, 26, 100)
    assert not keeps_graphs_across_sleep(None, 1, None)  # device memory unknown: drop
    assert keeps_graphs_across_sleep(True, 10**12, 1) and not keeps_graphs_across_sleep(False, 0, 100)
    eager = _loaded(False, keep_graphs=True)
    eager.generate(PROMPTS, GREEDY)
    assert not eager.keeps_graphs()  # no graphs: nothing to keep; sleep frees the cache
    eager.sleep()
    assert eager._cache is None
    eager.wake()


def test_default_device_and_graph_choice():
    from liteppo_mcore.parallel.device import compute_device
    from liteppo_mcore.rollout.fast_engine import FastEngine

    engine = FastEngine(_shape("qwen2"), SINGLE, eos_token_ids=[2], dtype=torch.float32)
    assert engine.device == compute_device()
    assert engine.use_cuda_graphs == torch.cuda.is_available()  # never under the strict virtual-device mode
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs"):
            FastEngine(_shape("qwen2"), SINGLE, eos_token_ids=[2], dtype=torch.float32, device="cuda",
                       use_cuda_graphs=True)
