"""The hf engine keeps the log-probs of the sampled tokens only: no [B, T, V] stack of logits.

`SampledLogprobs` (the logits processor) on a scripted decoding loop: the token of step t is gathered
from step t's row at the next call, the last one from the returned sequences, steps transformers undoes
are dropped, and it holds at most one [B, V] row. The engine end to end: `generate` is asked for no
logits or scores, the vocabulary-sized float tensors alive at any decode step stay a few [B, V] rows
whatever the response length (stacking every step's logits grows with it), and the log-probs equal an
independent full forward of the generated sequences.
"""

import gc

import pytest
import torch

from liteppo_mcore.models.shapes import ModelShape
from liteppo_mcore.parallel.mcore import ParallelGroups
from liteppo_mcore.rollout.engine import SamplingParams
from tests.unit.test_rollout_units import random_reference

VOCAB = 97  # no other dimension of the model is 97: a tensor whose last dimension is 97 holds logits
SHAPE = ModelShape(family="qwen2", num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                   num_query_groups=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                   rope_theta=10000.0, norm_epsilon=1e-6, tie_word_embeddings=True)
SINGLE = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11]]
EOS = 2
DEVICE = "cpu" if torch.cuda.is_available() else None  # None: the engine's own (compute_device())


def test_processor_gathers_each_token_from_its_own_step():
    from liteppo_mcore.rollout.hf_engine import SampledLogprobs

    torch.manual_seed(0)
    b, v, width, temperature = 3, 11, 4, 0.7
    ids = torch.randint(0, v, (b, width))
    keep = SampledLogprobs(width, temperature)
    rows, scores_seen = [], []
    for t in range(6):  # generate's loop: the processor sees the ids so far, then a token is drawn
        scores = torch.randn(b, v) * 3
        assert keep(ids, scores) is scores  # the scores pass through: transformers' warpers follow
        assert keep._row.shape == (b, v) and len(keep.steps) == t  # one [B, V] row held, t tokens decided
        scores_seen.append(scores)
        rows.append(torch.log_softmax(scores / temperature, dim=-1))
        ids = torch.cat([ids, torch.randint(0, v, (b, 1))], dim=1)
    tokens = ids[:, width:]
    want = torch.stack([rows[t].gather(-1, tokens[:, t:t + 1]).squeeze(-1) for t in range(6)], dim=1)
    assert torch.equal(keep.result(ids), want)  # the last token's row is gathered from the sequences

    undone = SampledLogprobs(width, temperature)  # transformers may run one step more, then undo it
    for t in range(6):
        undone(ids[:, : width + t], scores_seen[t])
    assert torch.equal(undone.result(ids[:, : width + 5]), want[:, :5])

    broken = SampledLogprobs(width, temperature)
    broken(ids[:, :width], scores_seen[0])
    with pytest.raises(RuntimeError, match="step 2 after step 0"):
        broken(ids[:, : width + 2], scores_seen[1])


@pytest.fixture(scope="module")
def engine_and_reference():
    from liteppo_mcore.rollout.hf_engine import HFEngine

    reference, stream = random_reference(SHAPE)
    engine = HFEngine(SHAPE, SINGLE, eos_token_ids=[EOS], dtype=torch.float32, device=DEVICE, pad_token_id=0)
    engine.update_weights([stream])
    return engine, reference


def _logit_bytes(params: set) -> int:
    """Bytes of the distinct storages of live float tensors whose last dimension is the vocabulary."""
    storages = {}
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or id(obj) in params or not obj.is_floating_point() \
                    or obj.dim() == 0 or obj.shape[-1] != VOCAB:
                continue
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError, ReferenceError):
            continue
    return sum(storages.values())


def _peak_logit_bytes(engine, params: SamplingParams, monkeypatch):
    """(generations, generation configs passed to generate, peak extra logit bytes at any forward)."""
    model = engine.model
    owned = {id(p) for p in model.parameters()}
    configs, peak = [], [0]
    base = _logit_bytes(owned)
    real_generate = model.generate

    def spy(*args, **kwargs):
        configs.append(kwargs["generation_config"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    hook = model.register_forward_hook(lambda *_: peak.__setitem__(0, max(peak[0], _logit_bytes(owned) - base)))
    try:
        out = engine.generate(PROMPTS, params)
    finally:
        hook.remove()
        monkeypatch.undo()
    return out, configs, peak[0]


def _recomputed(reference, prompt, gen, temperature):
    seq = torch.tensor([prompt + gen.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(reference(seq).logits[0].float() / temperature, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)


def test_hf_engine_keeps_no_per_step_logits(engine_and_reference, monkeypatch):
    engine, reference = engine_and_reference
    rows, row_bytes = len(PROMPTS) * 2, len(PROMPTS) * 2 * VOCAB * 4  # one float32 [B, V] row
    peaks = {}
    for steps in (4, 32):
        params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=steps, n=2, seed=5,
                                stop_token_ids=(1000,))  # never stops: every row decodes `steps` tokens
        out, configs, peaks[steps] = _peak_logit_bytes(engine, params, monkeypatch)
        assert configs and not any(c.output_logits or c.output_scores for c in configs)
        for prompt, gens in zip(PROMPTS, out):
            for gen in gens:
                assert len(gen.token_ids) == len(gen.logprobs) == steps
                want = _recomputed(reference, prompt, gen, 0.7)
                assert (want - torch.tensor(gen.logprobs)).abs().max() <= 1e-5
    # A few [B, V] rows at any step (the processor's row, this step's logits and the warped scores),
    # the same for 32 steps as for 4: a stack of every step's logits would hold 32 rows at the end.
    assert 0 < peaks[32] <= 8 * row_bytes, (peaks, row_bytes, rows)
    assert peaks[32] <= peaks[4] + 2 * row_bytes, peaks


def test_hf_engine_logprobs_when_rows_stop_early(engine_and_reference):
    """Rows that stop at different steps (generate returns fewer than max_new_tokens columns when all stop)."""
    engine, reference = engine_and_reference
    free = engine.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True,
                                                   stop_token_ids=(1000,)))
    stop = free[0][0].token_ids[2]  # row 0 stops at its 3rd token when greedy
    for greedy in (True, False):
        params = SamplingParams(temperature=0.9, max_new_tokens=12, n=1 if greedy else 3, seed=2, greedy=greedy,
                                stop_token_ids=(stop,))
        for prompt, gens in zip(PROMPTS, engine.generate(PROMPTS, params)):
            for gen in gens:
                assert len(gen.token_ids) == len(gen.logprobs)
                assert (gen.finish_reason == "stop") == (gen.token_ids[-1] == stop)
                want = _recomputed(reference, prompt, gen, 0.9)
                assert (want - torch.tensor(gen.logprobs)).abs().max() <= 1e-5
    assert engine.generate(PROMPTS[:1], SamplingParams(temperature=0.9, max_new_tokens=12, greedy=True,
                                                       stop_token_ids=(stop,)))[0][0].finish_reason == "stop"


def test_engines_place_on_the_compute_device():
    from liteppo_mcore.parallel.device import compute_device
    from liteppo_mcore.rollout.hf_engine import HFEngine, _rng_devices

    engine = HFEngine(SHAPE, SINGLE, eos_token_ids=[EOS], dtype=torch.float32)
    assert engine.device == compute_device() and next(engine.model.parameters()).device == engine.device
    if not torch.cuda.is_available():  # no GPU generator to fork, even for a (virtual) CUDA device
        assert _rng_devices(torch.device("cuda", 0)) == [] and _rng_devices(torch.device("cpu")) == []
