"""The built-in task max_digit: generator, tokenizer, reward, and the two probabilities that make it a
fair RL task (a random response scores > 0 at least 1% of the time; no constant answer is right on
more than 20% of the prompts)."""

import collections
import random
import re

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from liteppo_mcore.config.schema import DataConfig
from liteppo_mcore.data import (
    build_builtin_tokenizer,
    build_datasets,
    builtin_task_names,
    builtin_tasks,
    get_builtin_task,
    is_held_out,
    task_examples,
)
from liteppo_mcore.rewards import answer_match_reward, get_reward, reward_names

TASK = "max_digit"
PROMPT_RE = re.compile(r"^max:([0-9]{3,8})$")


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


@pytest.fixture(scope="module")
def train():
    return task_examples(TASK, "train")


@pytest.fixture(scope="module")
def held_out():
    return task_examples(TASK, "eval")


# --- generator ---------------------------------------------------------------------------------


def test_every_answer_is_the_largest_digit(train, held_out):
    for prompt, answer in train + held_out:
        match = PROMPT_RE.match(prompt)
        assert match, prompt
        assert answer == max(match.group(1)), (prompt, answer)


def test_split_sizes_and_disjointness(train, held_out):
    assert len(train) == 20000 and len(held_out) == 500
    assert len({p for p, _ in held_out}) == 500  # held-out prompts are distinct
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert not any(is_held_out(p) for p, _ in train)
    assert all(is_held_out(p) for p, _ in held_out)


def test_generation_is_deterministic(train, held_out):
    builtin_tasks._generate.cache_clear()  # regenerate from the fixed seed, not from the cache
    assert task_examples(TASK, "train") == train
    assert task_examples(TASK, "eval") == held_out
    assert train[:3] == [("max:017", "7"), ("max:00000000", "0"), ("max:972129", "9")]


def test_training_answers_are_close_to_uniform(train):
    counts = collections.Counter(a for _, a in train)
    assert sorted(counts) == list("0123456789")
    assert all(0.08 < c / len(train) < 0.12 for c in counts.values()), counts


def test_unknown_task_and_split():
    assert builtin_task_names() == [TASK]
    with pytest.raises(ValueError, match="Valid names: max_digit"):
        get_builtin_task("nope")
    with pytest.raises(ValueError, match="split"):
        task_examples(TASK, "test")


def test_every_task_has_a_reward_of_the_same_name():
    assert set(builtin_task_names()) <= set(reward_names())
    assert get_reward(TASK) is answer_match_reward


def test_datasets_fit_in_16_tokens(tokenizer):
    train_ds, held_ds = build_datasets(DataConfig(builtin_task=TASK), tokenizer, prompt_length=16)
    assert (len(train_ds), train_ds.num_dropped, len(held_ds), held_ds.num_dropped) == (20000, 0, 500, 0)
    assert max(len(s.prompt_ids) for s in train_ds) == 16  # 4 chat tokens + "max:" + 8 digits
    assert held_ds[0].source == f"builtin:{TASK}/eval#0"
    assert tokenizer.unk_token_id not in {t for s in train_ds for t in s.prompt_ids}


# --- tokenizer ---------------------------------------------------------------------------------


def test_vocabulary_and_special_tokens(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 29
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_one_token_per_character_and_round_trip(tokenizer):
    text = "max:0123456789 ,.?=+-\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("Q", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "m"}, {"role": "user", "content": "max:12"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>m<|end|><|user|>max:12<|end|><|assistant|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 13  # bos, system, m, end, user, 6 characters, end, assistant
    assert tokenizer.decode(ids, skip_special_tokens=True) == "mmax:12"
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_load_like_any_model_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    messages = [{"role": "user", "content": "max:907"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|bos|><|user|>max:907<|end|><|assistant|>"
    )
    assert loaded.decode(loaded.encode("max:907", add_special_tokens=False)) == "max:907"


# --- reward ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        ("7", "7", 1.0),
        ("7<|end|>", "7", 1.0),
        (" 7 \n", "7", 1.0),
        ("7<|pad|><|pad|>", "7", 1.0),
        ("77", "7", 0.5),  # right answer, then more: the stop is missing
        ("78<|end|>", "7", 0.5),
        ("7 8", "7", 0.5),
        ("7777", "7", 0.5),
        ("8", "7", 0.2),  # wrong, but one digit and then the end: well formed
        ("8<|end|>", "7", 0.2),
        ("87", "7", 0.0),
        ("x", "7", 0.0),
        ("", "7", 0.0),
        ("12<|end|>", "12", 1.0),  # longer answers work the same way
        ("123", "12", 0.5),
        ("13", "12", 0.2),
        ("1", "12", 0.0),
        ("1:", "12", 0.0),
        ("<|end|>7", "7", 0.0),
        ("<|user|>7", "7", 0.0),
    ],
)
def test_reward_table(response, answer, expected):
    assert answer_match_reward(response, answer) == expected


def test_reward_raises_on_internal_errors():
    with pytest.raises(ValueError, match="empty"):
        answer_match_reward("7", " ")
    with pytest.raises(TypeError):
        answer_match_reward(7, "7")


def test_reward_of_generated_tokens(tokenizer):
    answer_ids = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    for skip in (True, False):
        assert answer_match_reward(tokenizer.decode(answer_ids, skip_special_tokens=skip), "4") == 1.0


# --- the two probabilities ---------------------------------------------------------------------


def random_response_ids(rng, vocab_size, eos_id, max_len):
    """Uniform tokens from the whole vocabulary, a uniform length; generation stops at EOS."""
    ids = []
    for _ in range(rng.randint(1, max_len)):
        ids.append(rng.randrange(vocab_size))
        if ids[-1] == eos_id:
            break
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_response_scores_above_zero_at_least_one_percent(tokenizer, train, skip_special_tokens):
    rng = random.Random(7)
    length = get_builtin_task(TASK).response_length
    num = 20000
    scores = []
    for _ in range(num):
        ids = random_response_ids(rng, len(tokenizer), tokenizer.eos_token_id, length)
        _, answer = train[rng.randrange(len(train))]
        scores.append(answer_match_reward(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), answer))
    nonzero = sum(s > 0 for s in scores) / num
    right = sum(s == 1.0 for s in scores) / num
    # The requirement is nonzero >= 1%. Measured: about 19% (a digit, then the end of the turn) and
    # even the full reward about 1.7% (the right digit, then the end).
    assert nonzero >= 0.01, nonzero
    assert 0.15 < nonzero < 0.25, nonzero
    assert right >= 0.01, right


@pytest.mark.parametrize("split", ["train", "eval"])
def test_no_constant_response_is_right_on_more_than_20_percent(tokenizer, split):
    examples = task_examples(TASK, split)
    answer_counts = collections.Counter(a for _, a in examples)
    vocab = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    # Every response of one or two tokens: all digits with or without the end-of-turn token among them.
    candidates = set(vocab) | {a + b for a in vocab for b in vocab}
    best_right, best_mean = 0.0, 0.0
    for response in candidates:
        scores = {a: answer_match_reward(response, a) for a in answer_counts}
        best_right = max(best_right, sum(n for a, n in answer_counts.items() if scores[a] == 1.0) / len(examples))
        best_mean = max(best_mean, sum(n * scores[a] for a, n in answer_counts.items()) / len(examples))
    assert 0.05 < best_right <= 0.20, best_right  # measured: 10.5% (train), 14.0% (held out)
    assert best_mean < 0.35, best_mean  # measured: 0.28 (train), 0.31 (held out); the rule earns 1.0
