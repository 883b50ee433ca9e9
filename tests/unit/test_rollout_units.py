"""Rollout pieces that need no process group: the hf engine in one process (left padding, raw-logit
log-probs, seeds, weight checks), the mcore engine's sampler, engine selection and the metrics."""

import sys
import types

import pytest
import torch

from liteppo_mcore.models.shapes import ModelShape
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import SamplingParams

SHAPE = ModelShape(family="qwen2", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                   num_query_groups=2, head_dim=8, vocab_size=50, max_position_embeddings=128, rope_theta=10000.0,
                   norm_epsilon=1e-6, tie_word_embeddings=True)
SINGLE = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 3]]
EOS = 2


def random_reference(shape):
    """A transformers model of `shape` on the CPU with random weights (seed 0), and its weight stream
    (lm_head left out: the embeddings are tied)."""
    from liteppo_mcore.rollout.hf_engine import build_hf_model

    reference = build_hf_model(shape, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in reference.named_parameters():
            p.normal_(0.0, 0.3)
    return reference, [(k, v) for k, v in reference.state_dict().items() if k != "lm_head.weight"]


@pytest.fixture(scope="module")
def engine_and_reference():
    from liteppo_mcore.rollout.hf_engine import HFEngine

    reference, stream = random_reference(SHAPE)
    engine = HFEngine(SHAPE, SINGLE, eos_token_ids=[EOS], dtype=torch.float32, pad_token_id=0)
    engine.update_weights([stream[:5], stream[5:]])
    return engine, reference


def _recomputed_logp(reference, prompt, gen, temperature):
    seq = torch.tensor([prompt + gen.token_ids])
    with torch.no_grad():
        logits = reference(seq).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)


def test_hf_engine_logprobs_are_raw_full_vocab_and_padding_free(engine_and_reference):
    engine, reference = engine_and_reference
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=5, max_new_tokens=8, n=2, seed=3)
    out = engine.generate(PROMPTS, params)
    assert [len(g) for g in out] == [2, 2, 2]
    for prompt, gens in zip(PROMPTS, out):
        for gen in gens:
            assert len(gen.token_ids) == len(gen.logprobs) >= 1
            want = _recomputed_logp(reference, prompt, gen, 0.7)
            # unpadded recomputation at the temperature over the full vocabulary (top-p/top-k only shape
            # sampling): a renormalized or padded log-prob would differ by far more
            assert (want - torch.tensor(gen.logprobs)).abs().max() <= 1e-5
            if gen.finish_reason == "stop":
                assert gen.token_ids[-1] == EOS and EOS not in gen.token_ids[:-1]
            else:
                assert len(gen.token_ids) == 8 and EOS not in gen.token_ids
    again = engine.generate(PROMPTS, params)
    assert [[g.token_ids for g in gs] for gs in again] == [[g.token_ids for g in gs] for gs in out]
    other = engine.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=8, n=2, seed=4))
    assert [[g.token_ids for g in gs] for gs in other] != [[g.token_ids for g in gs] for gs in out]


def test_hf_engine_greedy_batch_equals_single_prompts(engine_and_reference):
    engine, reference = engine_and_reference
    params = SamplingParams(temperature=0.5, max_new_tokens=6, greedy=True, stop_token_ids=(7,))
    batch = engine.generate(PROMPTS, params)
    for prompt, gens in zip(PROMPTS, batch):
        alone = engine.generate([prompt], params)[0][0]
        assert gens[0].token_ids == alone.token_ids
        seq = list(prompt)
        for _ in range(len(alone.token_ids)):  # a plain greedy decode with the reference model
            with torch.no_grad():
                seq.append(int(reference(torch.tensor([seq])).logits[0, -1].argmax()))
        assert seq[len(prompt):] == alone.token_ids
        want = _recomputed_logp(reference, prompt, alone, 0.5)  # greedy log-probs are at the temperature
        assert (want - torch.tensor(alone.logprobs)).abs().max() <= 1e-5


def test_hf_engine_rejects_incomplete_or_foreign_streams():
    from liteppo_mcore.rollout.hf_engine import HFEngine

    engine = HFEngine(SHAPE, SINGLE, eos_token_ids=[EOS], dtype=torch.float32)
    with pytest.raises(KeyError, match="lacked"):
        engine.update_weights([[("model.norm.weight", torch.ones(32))]])
    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights([[("model.layers.9.mlp.up_proj.weight", torch.ones(48, 32))]])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([[("model.norm.weight", torch.ones(31))]])
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([[1]], SamplingParams(top_k=0))


def test_sampler_filters_top_k_and_top_p():
    from liteppo_mcore.rollout.mcore_engine import choose_tokens, filtered_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filtered_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filtered_logits(logits, 1.0, -1, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filtered_logits(logits, 1.0, -1, 0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filtered_logits(logits, 1.0, -1, 0.1)).tolist() == [[False, True, True, True]]
    g = torch.Generator().manual_seed(0)
    draws = choose_tokens(logits.expand(4000, 4), SamplingParams(temperature=1.0, top_p=0.8), g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03  # renormalized inside the nucleus only
    greedy = choose_tokens(logits, SamplingParams(greedy=True), g)
    assert greedy.tolist() == [0]


def _cfg(engine):
    from liteppo_mcore.config import load_config

    return load_config(overrides=[f"rollout.engine={engine}", "rollout.temperature=0.6", "rollout.top_k=7",
                                  "response_length=9", "num_return_sequences_in_group=3"], check=False)


def test_engine_selection_and_errors(monkeypatch):
    import importlib.util

    from liteppo_mcore import rollout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rollout.resolve_engine_name("auto") == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: types.SimpleNamespace() if name == "sglang" else real_find_spec(name, *a))
    assert rollout.resolve_engine_name("auto") == "sglang"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang" else real_find_spec(name, *a))
    assert rollout.resolve_engine_name("auto") == "hf"
    assert rollout.resolve_engine_name("mcore") == "mcore"
    with pytest.raises(rollout.RolloutEngineError, match="not an engine"):
        rollout.resolve_engine_name("vllm")
    with pytest.raises(rollout.RolloutEngineError, match="not an engine"):
        rollout.build_engine(types.SimpleNamespace(rollout=types.SimpleNamespace(engine="vllm")), None, None, [2])
    monkeypatch.setitem(sys.modules, "liteppo_mcore.rollout.sglang", None)  # the module is absent
    models = types.SimpleNamespace(shape=SHAPE)
    with pytest.raises(rollout.RolloutEngineError, match="no SGLang engine module"):
        rollout.build_engine(_cfg("sglang"), models, SINGLE, [2])
    with pytest.raises(rollout.RolloutEngineError, match="eos_token_id"):
        rollout.build_engine(_cfg("hf"), models, SINGLE, types.SimpleNamespace(eos_token_id=None))


def test_build_engine_hf_and_sglang_hook(monkeypatch):
    from liteppo_mcore import rollout
    from liteppo_mcore.rollout.hf_engine import HFEngine

    actor = torch.nn.Linear(2, 2)
    models = types.SimpleNamespace(shape=SHAPE, actor=actor)
    tokenizer = types.SimpleNamespace(eos_token_id=EOS)
    engine = rollout.build_engine(_cfg("hf"), models, SINGLE, tokenizer)
    assert isinstance(engine, HFEngine) and engine.eos_token_ids == (EOS,) and engine.needs_weight_sync
    calls = []
    fake = types.ModuleType("liteppo_mcore.rollout.sglang")
    fake.build_sglang_engine = lambda cfg, m, g, eos: calls.append(eos) or "sglang-engine"
    monkeypatch.setitem(sys.modules, "liteppo_mcore.rollout.sglang", fake)
    assert rollout.build_engine(_cfg("sglang"), models, SINGLE, [EOS, 5]) == "sglang-engine"
    assert calls == [[EOS, 5]]


def test_sampling_params_from_config():
    from liteppo_mcore.rollout import sampling_params_from_config

    p = sampling_params_from_config(_cfg("hf"), seed=5)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.n, p.seed, p.greedy) == (0.6, 1.0, 7, 9, 3, 5, False)
    q = sampling_params_from_config(_cfg("hf"), greedy=True, n=1, stop_token_ids=[2])
    assert q.greedy and q.n == 1 and q.temperature == 0.6 and q.stop_token_ids == (2,)


def test_logprob_abs_diff_global_mean():
    from liteppo_mcore.rollout.metrics import logprob_abs_diff

    a = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert logprob_abs_diff(a, b, mask) == pytest.approx(0.75 / 3)
    other_rank = torch.tensor([1.25, 7.0], dtype=torch.float64)  # the other DP rank: sum 1.25 over 7 tokens
    assert logprob_abs_diff(a, b, mask, allreduce=lambda x: x + other_rank) == pytest.approx(2.0 / 10)
    assert logprob_abs_diff(a, b, torch.zeros_like(mask)) == 0.0


class _FakeExporter:
    def __init__(self, tensors):
        self.tensors = tensors

    def buckets(self):
        yield list(self.tensors.items())[:1]
        yield list(self.tensors.items())[1:]


def test_check_weights_equal_names_the_first_difference():
    from liteppo_mcore.rollout.metrics import WeightSyncError, check_weights_equal

    trainer = {"a": torch.zeros(3), "b": torch.ones(2, 2), "c": torch.ones(1)}
    held = {k: v.clone() for k, v in trainer.items()}
    engine = types.SimpleNamespace(name="hf", needs_weight_sync=True, get_weight=held.get)
    assert check_weights_equal(engine, _FakeExporter(trainer)) == 3
    held["b"][1, 0] += 0.5
    held["c"] += 1.0
    with pytest.raises(WeightSyncError, match=r"b: max abs difference 5\.000e-01"):
        check_weights_equal(engine, _FakeExporter(trainer))
    no_copy = types.SimpleNamespace(name="mcore", needs_weight_sync=False)
    assert check_weights_equal(no_copy, _FakeExporter(trainer)) == 0
    with pytest.raises(WeightSyncError, match="cannot report"):
        check_weights_equal(types.SimpleNamespace(name="x", needs_weight_sync=True), _FakeExporter(trainer))
