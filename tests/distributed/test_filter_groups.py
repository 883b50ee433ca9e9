"""Dynamic sampling (filter_groups) in the trainer, at DP=1 and DP=2 (gloo processes, in-process
trainers): uniform groups are dropped and the step is topped up with further rounds; every group the
update trains on is informative, whole and equally many on each rank, its fields still together after
the ranks exchanged them; a resumed run gives the metrics of the uninterrupted one; a step without any
informative group makes no update and counts as a bad step (zero gradient)."""

import math
import os
import re

import pytest

from tests.distributed.spawn import run_gloo

CONFIG = "examples/tiny_cpu.yaml"
B, N, ROUNDS = 8, 4, 2
SMALL = [f"rollout_batch_size={B}", f"num_return_sequences_in_group={N}", "train.mini_batch_size=8",
         "train.micro_batch_size=8", "eval.enabled=false", "logging.tensorboard=false", "logging.plot=false",
         "logging.num_sample_completions=0", "logging.log_interval=100", "reward.num_workers=1",
         "filter_groups=true", f"filter_groups_max_rounds={ROUNDS}"]
STEPS = 3

# Half of the prompts (even answers) get reward 0 for every response: their groups are uniform. The
# others get 0 or 0.5 by a hash of the response text: mostly informative, uniform now and then.
REWARDS = '''
import zlib


def half_uniform(response, answer):
    if int(answer) % 2 == 0:
        return 0.0
    return 0.5 * (zlib.crc32(response.encode()) & 1)


def constant(response, answer):
    return 0.25
'''


def _load(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location("filter_groups_rewards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _record_updates(trainer, reward_fn):
    """Wrap `trainer.update`: what each step trains on (this rank's share), scored again here."""
    seen = []
    original = trainer.update

    def update(rollout, step):
        b = rollout.batch
        prompts = trainer.tokenizer.batch_decode([row[:int(p)] for row, p in zip(b.tokens.tolist(), b.prompt_lens)])
        texts = trainer.tokenizer.batch_decode([row[int(p):int(p) + int(r)] for row, p, r in
                                                zip(b.tokens.tolist(), b.prompt_lens, b.response_lens)],
                                               skip_special_tokens=True)
        seen.append({"step": step, "prompts": prompts, "answers": list(rollout.answers),
                     "texts": list(rollout.response_texts), "decoded": texts,
                     "scores": [reward_fn(t, a) for t, a in zip(rollout.response_texts, rollout.answers)]})
        return original(rollout, step)

    trainer.update = update
    return seen


def _jobs(rank, world, rewards_path, jobs):
    """Run each job's trainer in turn: {name: (metrics rows on rank 0, what each step trained on, halted)}."""
    from liteppo_mcore.config import load_config
    from liteppo_mcore.halt import TrainingHalted
    from liteppo_mcore.parallel.mcore import destroy_model_parallel
    from liteppo_mcore.trainer.loop import Trainer
    from liteppo_mcore.utils.sinks import read_metrics

    results = {}
    for name, fn_name, overrides in jobs:
        cfg = load_config(CONFIG, [*overrides, f"reward.name={rewards_path}:{fn_name}"], world_size=world)
        try:
            trainer = Trainer(cfg)
        except BaseException:
            destroy_model_parallel()
            raise
        halted = None
        try:
            seen = _record_updates(trainer, _load(rewards_path, fn_name))
            try:
                trainer.fit()
            except TrainingHalted as e:
                halted = str(e)
        finally:
            trainer.close()
        rows = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl")) if rank == 0 else None
        results[name] = (rows, seen, halted)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter_groups")
    rewards = root / "filter_rewards.py"
    rewards.write_text(REWARDS)
    out = {}
    for world in (1, 2):
        full, resumed = str(root / f"dp{world}" / "full"), str(root / f"dp{world}" / "resumed")
        jobs = [("full", "half_uniform", [*SMALL, f"output_dir={full}", f"max_steps={STEPS}",
                                          "checkpoint.save_interval=1"]),
                ("resumed", "half_uniform", [*SMALL, f"output_dir={resumed}", f"max_steps={STEPS}",
                                             "checkpoint.save_interval=0",
                                             f"checkpoint.load={full}/checkpoints/iter_0000001"])]
        if world == 1:  # one round only: short steps; mini_batch_size = B x n: each trains as one smaller mini-batch
            one_round = [o for o in SMALL if not o.startswith("filter_groups_max_rounds=")]
            jobs.append(("one_minibatch", "half_uniform", [*one_round, "filter_groups_max_rounds=1", "ppo_epochs=2",
                                                           f"train.mini_batch_size={B * N}", "max_steps=2",
                                                           f"output_dir={root / 'one_minibatch'}",
                                                           "checkpoint.save_interval=0"]))
        if world == 2:
            jobs.append(("constant", "constant", [*SMALL, f"output_dir={root / 'constant'}", "max_steps=4",
                                                  "checkpoint.save_interval=0", "train.max_consecutive_bad_steps=2"]))
        out[world] = run_gloo(_jobs, world, str(rewards), jobs, timeout=600)
    return out


def _steps(rows):
    return [r for r in rows if r["step"] > 0]


@pytest.mark.parametrize("world", [1, 2])
def test_uniform_groups_are_dropped_and_the_step_topped_up(runs, world):
    rows = _steps(runs[world][0]["full"][0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        rounds, filtered, kept = r["rollout/generation_rounds"], r["rollout/filtered_groups"], \
            r["rollout/informative_groups"]
        assert rounds in (1, 2) and 0 < kept <= B and kept % world == 0
        assert filtered + kept <= rounds * B  # the rest: informative groups beyond what is kept
        assert filtered >= 1 and math.isfinite(r["actor/grad_norm"]) and r["actor/grad_norm"] > 0
        for key in ("reward/mean", "reward/std", "reward/errors", "response_length/mean", "actor/pg_loss"):
            assert key in r and math.isfinite(r[key]), key
        if kept < B:
            assert rounds == ROUNDS  # short only when the cap was reached
    assert any(r["rollout/generation_rounds"] > 1 for r in rows)
    assert any(r["rollout/informative_groups"] < B for r in rows)  # a short step (the cap), trained on N' < B x n
    # the rewards of every response generated: half of them (even answers) are exactly 0
    assert all(0.0 <= r["reward/mean"] < 0.5 and r["reward/min"] == 0.0 for r in rows)


@pytest.mark.parametrize("world", [1, 2])
def test_every_trained_group_is_informative_and_whole(runs, world):
    per_rank = [result["full"][1] for result in runs[world]]
    rows = {r["step"]: r for r in _steps(runs[world][0]["full"][0])}
    for step in range(STEPS):
        shares = [seen[step] for seen in per_rank]
        assert all(s["step"] == step + 1 for s in shares)  # Trainer.update gets the 1-based step
        sizes = [len(s["answers"]) for s in shares]
        assert len(set(sizes)) == 1 and sizes[0] % N == 0  # whole groups, equally many on each rank
        assert sum(sizes) // N == rows[step + 1]["rollout/informative_groups"]
        for share in shares:
            for g in range(0, len(share["answers"]), N):
                scores, answers = share["scores"][g:g + N], share["answers"][g:g + N]
                assert len(set(scores)) > 1, (step, g, scores)  # informative
                assert len(set(answers)) == 1 and len(set(share["prompts"][g:g + N])) == 1
                digits = re.search(r"max:(\d+)", share["prompts"][g]).group(1)
                assert max(digits) == answers[0]  # the prompt's tokens and its answer travelled together
            assert share["texts"] == share["decoded"]  # and the response tokens with their texts


@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_the_metrics_of_an_uninterrupted_run(runs, world):
    def comparable(row):
        return {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}

    want = {r["step"]: comparable(r) for r in runs[world][0]["full"][0]}
    got = _steps(runs[world][0]["resumed"][0])
    assert [r["step"] for r in got] == list(range(2, STEPS + 1))
    for row in got:
        expected = want[row["step"]]
        assert comparable(row).keys() == expected.keys()
        for key, value in comparable(row).items():
            assert value == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (row["step"], key)


def test_a_step_without_informative_groups_makes_no_update_and_counts_as_bad(runs):
    rows, seen, halted = runs[2][0]["constant"]
    rows = _steps(rows)
    assert seen == []  # no update at all
    assert [r["step"] for r in rows] == [1, 2]  # halted by train.max_consecutive_bad_steps=2
    assert halted is not None and "gradient norm was 0" in halted
    for r in rows:
        assert r["rollout/generation_rounds"] == ROUNDS and r["rollout/filtered_groups"] == ROUNDS * B
        assert r["rollout/informative_groups"] == 0 and r["actor/grad_norm"] == 0.0
        assert r["reward/mean"] == pytest.approx(0.25) and r["reward/errors"] == 0


def test_a_short_step_trains_as_one_smaller_mini_batch(runs):
    rows, seen, halted = runs[1][0]["one_minibatch"]
    rows = _steps(rows)
    assert halted is None and [r["step"] for r in rows] == [1, 2] and len(seen) == 2
    for r, share in zip(rows, seen):
        kept = r["rollout/informative_groups"]
        assert r["rollout/generation_rounds"] == 1 and kept + r["rollout/filtered_groups"] == B
        assert 0 < kept < B and len(share["answers"]) == kept * N < B * N  # every informative group: < one mini-batch
        assert r["actor/skipped_updates"] == 0 and math.isfinite(r["actor/grad_norm"]) and r["actor/grad_norm"] > 0
