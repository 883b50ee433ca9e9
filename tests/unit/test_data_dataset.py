"""Loading prompt files: field names, chat template or plain text, system prompts, length filtering."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from liteppo_mcore.config.schema import DataConfig, ModelConfig
from liteppo_mcore.data import (
    DataError,
    build_builtin_tokenizer,
    build_dataset,
    build_datasets,
    load_tokenizer,
    render_prompt,
    tokenizer_from_config,
)

# The built-in tokenizer's chat format, written out by hand.
BOS, END, SYSTEM, USER, ASSISTANT = "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_with_custom_field_names(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"q": "max:12", "a": "2"}, {"q": "max:907", "a": 9}])
    data = DataConfig(train_path=str(path), prompt_key="q", answer_key="a")
    ds = build_dataset(data, tokenizer, prompt_length=64)
    assert len(ds) == 2 and ds.num_dropped == 0 and ds.num_read == 2
    assert [s.answer for s in ds] == ["2", "9"]  # a numeric answer becomes its text
    assert ds[0].prompt_text == f"{BOS}{USER}max:12{END}{ASSISTANT}"
    assert ds[0].source == f"{path}:1" and ds[1].source == f"{path}:2"
    assert [s.index for s in ds] == [0, 1]


def test_prompt_ids_are_the_encoded_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "max:12", "answer": "2"}])
    sample = build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=64)[0]
    vocab = tokenizer.get_vocab()
    expected = [vocab[t] for t in (BOS, USER, "m", "a", "x", ":", "1", "2", END, ASSISTANT)]
    assert sample.prompt_ids == expected


def test_plain_prompts_without_chat_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "max:12", "answer": "2"}])
    data = DataConfig(train_path=str(path), apply_chat_template=False, system_prompt="max")
    sample = build_dataset(data, tokenizer, prompt_length=64)[0]
    assert sample.prompt_text == "max\n\nmax:12"
    assert tokenizer.decode(sample.prompt_ids) == "max\n\nmax:12"


def test_system_prompt_and_per_sample_system_key(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "max:1", "answer": "1", "sys": "a"},
            {"prompt": "max:2", "answer": "2"},
            {"prompt": "max:3", "answer": "3", "sys": None},
        ],
    )
    data = DataConfig(train_path=str(path), system_key="sys", system_prompt="x")
    texts = [s.prompt_text for s in build_dataset(data, tokenizer, prompt_length=64)]
    assert texts == [
        f"{BOS}{SYSTEM}a{END}{USER}max:1{END}{ASSISTANT}",  # the per-sample field wins
        f"{BOS}{SYSTEM}x{END}{USER}max:2{END}{ASSISTANT}",  # absent: the global system prompt
        f"{BOS}{SYSTEM}x{END}{USER}max:3{END}{ASSISTANT}",  # null: the same
    ]


def test_prompt_given_as_messages(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "m"}, {"role": "user", "content": "max:45"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": messages, "answer": "5"}])
    sample = build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=64)[0]
    assert sample.prompt_text == f"{BOS}{SYSTEM}m{END}{USER}max:45{END}{ASSISTANT}"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user"}], "answer": "5"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'prompt' is a list"):
        build_dataset(DataConfig(train_path=str(bad)), tokenizer, prompt_length=64)
    with pytest.raises(DataError, match="needs a chat template"):
        build_dataset(DataConfig(train_path=str(path), apply_chat_template=False), tokenizer, prompt_length=64)


def test_parquet_file(tokenizer, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["max:31", "max:5"], "solution": ["3", "5"]}), path)
    data = DataConfig(train_path=str(path), prompt_key="question", answer_key="solution")
    ds = build_dataset(data, tokenizer, prompt_length=64)
    assert [(s.answer, s.source) for s in ds] == [("3", f"{path} row 0 (0-based)"), ("5", f"{path} row 1 (0-based)")]
    assert ds[1].prompt_text == f"{BOS}{USER}max:5{END}{ASSISTANT}"


def test_long_prompts_are_dropped_and_counted(tokenizer, tmp_path, caplog):
    # Chat overhead is 4 tokens (bos, user, end, assistant): "max:" + n digits is 8 + n tokens.
    records = [{"prompt": "max:" + "1" * n, "answer": "1"} for n in (1, 2, 3, 4, 5, 6)]
    path = write_jsonl(tmp_path / "len.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="liteppo_mcore.data.dataset"):
        ds = build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=11)
    assert [len(s.prompt_ids) for s in ds] == [9, 10, 11]
    assert (ds.num_read, ds.num_dropped, len(ds)) == (6, 3, 3)
    assert [s.source for s in ds] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert [s.index for s in ds] == [0, 1, 2]
    assert "dropped 3 of 6 prompts longer than prompt_length=11 tokens (the longest has 14)" in caplog.text


def test_all_prompts_too_long_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "max:123456", "answer": "6"}] * 3)
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=8)
    message = str(info.value)
    assert str(path) in message and "all 3 prompts are longer than prompt_length=8" in message
    assert "the longest has 14" in message and "Raise prompt_length" in message


def test_build_datasets_without_eval(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "max:1", "answer": "1"}])
    train, held_out = build_datasets(DataConfig(train_path=str(path)), tokenizer, prompt_length=64)
    assert len(train) == 1 and held_out is None
    train, held_out = build_datasets(DataConfig(train_path=str(path), eval_path=str(path)), tokenizer, prompt_length=64)
    assert len(held_out) == 1 and held_out.name == str(path)


def test_tokenizer_round_trip_through_a_directory(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.encode("max:907", add_special_tokens=False) == tokenizer.encode("max:907", add_special_tokens=False)
    assert render_prompt(loaded, "max:9") == f"{BOS}{USER}max:9{END}{ASSISTANT}"
    from_config = tokenizer_from_config(ModelConfig(tokenizer_path=str(tmp_path / "tok")), DataConfig())
    assert from_config.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_from_config_prefers_paths_then_builtin(tmp_path):
    tok = tokenizer_from_config(ModelConfig(), DataConfig(builtin_task="max_digit"))
    assert tok.eos_token == END and len(tok) == len(build_builtin_tokenizer())
    with pytest.raises(DataError, match=r"does not exist"):
        tokenizer_from_config(ModelConfig(hf_path=str(tmp_path / "model")), DataConfig(builtin_task="max_digit"))


def test_text_the_tokenizer_cannot_write_is_refused(tokenizer, tmp_path):
    # arithmetic words the built-in character tokenizer lacks ("what", "is", "plus"): mostly <|unk|>
    path = write_jsonl(tmp_path / "words.jsonl", [{"prompt": "What is 3 plus 4?", "answer": "7"}] * 3)
    with pytest.raises(DataError, match=r"words.jsonl: \d+ of the prompts' \d+ tokens \(\d+\.\d%\) are the "
                                        r"tokenizer's unknown token '<\|unk\|>'.*model.tokenizer_path="):
        build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=64)
    # a stray unknown character in otherwise covered text is tolerated (under 1% of the tokens)
    good = [{"prompt": "max:" + "1234567890" * 12, "answer": "9"}] * 3 + [{"prompt": "max:12\u00e9", "answer": "2"}]
    path = write_jsonl(tmp_path / "ok.jsonl", good)
    assert len(build_dataset(DataConfig(train_path=str(path)), tokenizer, prompt_length=256)) == 4
