"""CUDA graphs of the `fast` engine: greedy decoding through the captured graphs equals eager decoding
(same tokens, log-probs within helpers.GRAPH_LOGPROB_MAX_ABS, fp32), and a weight update after the
capture changes what the graphs compute (the weights are updated in place, the graphs are replayed, not
captured again) to what eager decoding gives with the new weights."""

import torch

from tests.gpu import helpers as H

pytestmark = H.gpu_marks(cuda_only=True)

PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12], [1, 3]]  # 3 rows: the graphs run a bucket of 4
NEVER = 10_000  # a stop id outside the vocabulary: every row runs to max_new_tokens


def _engines():
    from liteppo_mcore.models.shapes import ModelShape
    from liteppo_mcore.parallel.mcore import ParallelGroups
    from liteppo_mcore.rollout.fast_engine import FastEngine

    shape = ModelShape(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, head_dim=16, vocab_size=128, max_position_embeddings=96,
                       rope_theta=10000.0, norm_epsilon=1e-6, tie_word_embeddings=True)
    single = ParallelGroups(None, None, None, None, None, 0, 1, 0, 1, 0, 1, 0, 1)
    return [FastEngine(shape, single, eos_token_ids=[2], dtype=torch.float32, device="cuda", pad_token_id=0,
                       use_cuda_graphs=graphs) for graphs in (False, True)]


def _weights(engine, seed):
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(t.shape, generator=g) * 0.3) for name, t in engine.decoder.params.items()]


def _compare(eager, graphed):
    tokens_equal = [a[0].token_ids == b[0].token_ids for a, b in zip(eager, graphed)]
    diff = max(abs(p - q) for a, b in zip(eager, graphed) for p, q in zip(a[0].logprobs, b[0].logprobs))
    return tokens_equal, diff


def test_graphed_decode_equals_eager_and_follows_weight_updates():
    from liteppo_mcore.rollout.engine import SamplingParams

    eager, graphed = _engines()
    assert graphed.use_cuda_graphs and not eager.use_cuda_graphs
    greedy = SamplingParams(temperature=0.7, max_new_tokens=12, greedy=True, stop_token_ids=(NEVER,))
    first = _weights(eager, 0)
    for engine in (eager, graphed):
        engine.update_weights([first])
    before = (eager.generate(PROMPTS, greedy), graphed.generate(PROMPTS, greedy))
    captured = {batch: id(graph) for batch, graph in graphed._graphs.items()}
    second = _weights(eager, 1)
    for engine in (eager, graphed):
        engine.update_weights([second])
    after = (eager.generate(PROMPTS, greedy), graphed.generate(PROMPTS, greedy))
    report = {"before": _compare(*before), "after": _compare(*after), "graphs": sorted(captured),
              "recaptured": {b: id(g) for b, g in graphed._graphs.items()} != captured}
    H.write_report("fast_engine_graphs", report)
    assert captured, "no CUDA graph was captured"
    for stage in ("before", "after"):
        tokens_equal, diff = report[stage]
        assert all(tokens_equal) and diff <= H.GRAPH_LOGPROB_MAX_ABS, (stage, report[stage])
    assert not report["recaptured"]  # replayed with the new weights, not captured again
    changed = [a[0].token_ids != b[0].token_ids for a, b in zip(before[1], after[1])]
    assert any(changed), "the graphed engine's output did not change after a weight update"
