"""tools/train_tokenizer.py: a byte-level BPE from prompt files, loadable by the trainer, with the built-in
tokenizer's special tokens and chat format; bad input exits 2 with a message."""

import importlib.util
import json
import os

import pytest

from liteppo_mcore.data import build_builtin_tokenizer, load_tokenizer, render_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(ROOT, "tools", "train_tokenizer.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

ROWS = [
    {"prompt": "Natalia sold clips to 48 of her friends in April.", "answer": "72"},
    {"prompt": [{"role": "user", "content": "Solve x + 1 = 3 for x, please."}], "answer": 2},
    {"prompt": "What is 1/2 + 1/4? Écrivez la réponse.", "answer": "\\frac{3}{4}"},
] * 20


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_the_folder_loads_and_writes_any_text(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = str(tmp_path / "tok")
    assert tool.main([data, "--out", out, "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    assert f"model.tokenizer_path={out}" in printed
    tok = load_tokenizer(out)
    assert 263 < len(tok) <= 300  # 256 bytes + 7 special tokens + merges learned from the prompts
    seen = ROWS[0]["prompt"]
    # merges learned from the data
    assert len(tok(seen, add_special_tokens=False)["input_ids"]) < 0.7 * len(seen.encode())
    never_seen = "Ωμέγα 東京 🙂 §"
    ids = tok(never_seen, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == never_seen
    builtin = build_builtin_tokenizer()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(builtin, name)
    assert render_prompt(tok, "hi", system="be brief") == render_prompt(builtin, "hi", system="be brief")


def test_chat_message_contents_and_answers_are_learned_from(tmp_path):
    texts = list(tool.record_texts([write_jsonl(tmp_path / "t.jsonl", ROWS[:3])], "prompt", "answer"))
    assert texts == [ROWS[0]["prompt"], "72", "Solve x + 1 = 3 for x, please.", "2", ROWS[2]["prompt"], "\\frac{3}{4}"]


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such file"),
    ("no_field", "no field 'prompt'"),
    ("vocab", "needs at least 263"),
    ("not_empty", "exists and is not empty"),
    ("bad_json", "t.jsonl:1"),
])
def test_bad_input_exits_2_naming_the_problem(tmp_path, capsys, case, expected):
    data = write_jsonl(tmp_path / "t.jsonl", ROWS)
    out = tmp_path / "tok"
    args = [data, "--out", str(out)]
    if case == "missing":
        args[0] = str(tmp_path / "absent.jsonl")
    elif case == "no_field":
        write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "1"}])
    elif case == "vocab":
        args += ["--vocab-size", "100"]
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "bad_json":
        (tmp_path / "t.jsonl").write_text("{not json\n")
    assert tool.main(args) == 2
    assert expected in capsys.readouterr().err
    if case == "not_empty":
        assert os.listdir(out) == ["keep.txt"]
