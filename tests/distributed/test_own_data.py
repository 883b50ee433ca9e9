"""A user's own data, end to end: docs/data_and_rewards.md's "Your own data, end to end" commands run as
written on a GSM8K-shaped file (tools/prepare_data.py, tools/train_tokenizer.py, then 200 steps under
torchrun with 2 CPU processes), and the reward and the held-out accuracy rise."""

import json
import random
import re

import pytest

from tests import doc_blocks as D

DOC = "docs/data_and_rewards.md"
HEADING = "## Your own data, end to end"
NUM_QUESTIONS = 3000


def doc_commands():
    """The commands of the section's bash block."""
    def section(block):  # the heading of the section the block stands in
        return "## " + D.text_before(block).rsplit("\n## ", 1)[-1].split("\n", 1)[0]

    block = next(b for b in D.blocks_of(DOC) if b.lang == "bash" and section(b) == HEADING)
    return D.logical_lines(block.text)


def gsm8k_like(path, n, seed=0):
    """GSM8K's shape (question; answer with its reasoning and '#### N'): which digit of a list is the largest,
    the answer uniform over 0-9 and the other digits at most the answer."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            answer = rng.randrange(10)
            digits = [rng.randint(0, answer) for _ in range(rng.randint(2, 7))]
            digits.insert(rng.randrange(len(digits) + 1), answer)
            listed = " ".join(map(str, digits))
            f.write(json.dumps({"question": f"Largest digit of {listed}?",
                                "answer": f"Of {listed} the largest is {answer}.\n#### {answer}"}) + "\n")


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_the_documented_commands_train_on_a_gsm8k_shaped_file(tmp_path):
    commands = doc_commands()
    assert [c.split()[1] for c in commands] == ["tools/prepare_data.py", "tools/train_tokenizer.py",
                                                "--nproc_per_node"], commands
    gsm8k_like(tmp_path / "gsm8k_train.jsonl", NUM_QUESTIONS)
    D.make_sandbox(str(tmp_path))  # the commands name tools/, launch/, examples/ relative to the checkout
    outputs = [D.check(D.run_lines([command], str(tmp_path), timeout=900), command).stdout for command in commands]
    prepared, tokenizer_out, train_out = outputs

    # prepare_data printed the very overrides the training command uses
    overrides = prepared.split("train on it with the overrides:\n", 1)[1].split("\n", 1)[0].split()
    assert overrides and all(o in commands[2].split() for o in overrides), (overrides, commands[2])
    assert "model.tokenizer_path=my_tokenizer" in tokenizer_out

    run_dir = tmp_path / re.search(r"output_dir=(\S+)", commands[2]).group(1)
    rows = _rows(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    print(f"reward {first:.3f} -> {last:.3f}; held-out accuracy {evals}")
    assert last >= first + 0.25, (first, last)
    assert evals[0][0] == 0 and evals[-1][1] >= evals[0][1] + 0.2, evals

    # the samples are text of this tokenizer, and the checkpoint carries it for the export
    samples = _rows(run_dir / "samples.jsonl")
    assert samples and samples[-1]["step"] == rows[-1]["step"]
    assert all(s["prompt"].startswith("<|bos|><|user|>Largest digit of") for s in samples), samples[0]
    latest = open(run_dir / "checkpoints" / "latest", encoding="utf-8").read().strip()
    from transformers import AutoTokenizer

    stored = AutoTokenizer.from_pretrained(str(run_dir / "checkpoints" / latest / "hf"))
    mine = AutoTokenizer.from_pretrained(str(tmp_path / "my_tokenizer"))
    assert stored.get_vocab() == mine.get_vocab() and stored.chat_template == mine.chat_template
    assert f"done: {rows[-1]['step']} steps" in train_out
