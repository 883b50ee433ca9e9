"""tools/prepare_data.py: every input shape becomes {"prompt", "answer"} JSONL that the trainer's own reader
loads with the default data section; answers are extracted exactly; the held-out split is deterministic
and disjoint; unusable rows are counted and too many of them fail with exit 2."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "prepare_data.py")

_spec = importlib.util.spec_from_file_location("prepare_data", TOOL)
prep = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("prepare_data", prep)  # dataclasses look their module up there
_spec.loader.exec_module(prep)

try:
    import datasets  # noqa: F401

    HAVE_DATASETS = True
except ImportError:
    HAVE_DATASETS = False


# ---------------------------------------------------------------------------------------------------
# Inputs, built here


GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "A shop sells 1200 pens a week. How many pens in 52 weeks?",
     "answer": "1200 * 52 = 62400\n#### 62,400"},
    {"question": "The temperature fell by 7 degrees from 2 degrees. What is it now?",
     "answer": "2 - 7 = -5\n####  -5 "},
]

MATH = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
     "solution": "We add: $\\frac{1}{4}+\\frac{1}{4}=\\boxed{\\frac{1}{2}}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Find $x$ if $2x = 6$.",
     "solution": "First $\\boxed{2x=6}$, so $x = \\boxed{3}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Which set solves $x^2 = x$?",
     "solution": "The roots are $0$ and $1$: $\\fbox{\\{0,1\\}}$.", "level": "Level 2", "type": "Algebra"},
]

MATH500 = [
    {"problem": "Compute $\\sqrt{16}$.", "solution": "It is $\\boxed{4}$.", "answer": "4",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "Halve: $\\boxed{\\dfrac12}$.", "answer": "\\frac{1}{2}",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/2.json"},
]


def verl_rows(n=6, data_source="openai/gsm8k"):
    return [{
        "data_source": data_source,
        "prompt": [{"role": "system", "content": "You are a careful solver."},
                   {"role": "user", "content": f"What is {i} plus {i}? Put the answer in a box."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"index": i, "split": "train"},
    } for i in range(n)]


def dapo_rows(problems, repeat=1):
    rows = []
    for _ in range(repeat):
        for i, (problem, answer) in enumerate(problems):
            content = f"{prep.DAPO_HEAD}\n\n{problem}\n\n{prep.DAPO_TAIL}"
            rows.append({"data_source": "math_dapo", "prompt": [{"content": content, "role": "user"}],
                         "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                         "extra_info": {"index": f"id-{i}"}})
    return rows


DAPO_PROBLEMS = [("How many primes are below 20?", "8"), ("What is 3 times 11?", "33"), ("Compute 2 to the 5.", "32")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cli(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, timeout=60)


def run_main(capsys, *args):
    code = prep.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------------------------
# Our own reader, with a small BPE tokenizer trained on the tests' text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (every byte is in its alphabet, so nothing is unknown) with a chat template,
    saved with save_pretrained and loaded back through the trainer's load_tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from liteppo_mcore.data import load_tokenizer

    specials = ["<|pad|>", "<|bos|>", "<|end|>", "<|unk|>"]
    corpus = [json.dumps(r) for r in GSM8K + MATH + MATH500 + verl_rows() + dapo_rows(DAPO_PROBLEMS)]
    core = Tokenizer(models.BPE(unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|end|>", unk_token="<|unk|>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '<|end|>' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def load_with_reader(tokenizer, train, eval_path=None, split="train"):
    from liteppo_mcore.config.schema import DataConfig
    from liteppo_mcore.data import build_dataset

    return build_dataset(DataConfig(train_path=train, eval_path=eval_path), tokenizer, prompt_length=512, split=split)


# ---------------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("$\\boxed{1}$ then $\\boxed{\\sqrt{\\frac{a}{b}}}$", "\\sqrt{\\frac{a}{b}}"),
    ("first \\boxed{2} last \\fbox{7}", "7"),
    ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),
    ("$\\boxed{\\left\\{ x \\right\\}}$", "\\left\\{ x \\right\\}"),
    ("The answer is $\\boxed 5$.", "5"),
    ("\\boxed {12}", "12"),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert prep.last_boxed(text) == expected


@pytest.mark.parametrize("text", ["$\\boxed{\\frac{1}{2}$", "\\boxed{ {a} ", "\\boxed"])
def test_last_boxed_unbalanced_is_a_skip(text):
    with pytest.raises(prep.Skip) as e:
        prep.last_boxed(text)
    assert "\\boxed" in e.value.reason


@pytest.mark.parametrize("text,expected", [("x\n#### 72", "72"), ("#### 62,400", "62400"), ("a #### 1 #### -5 ", "-5"),
                                           ("#### 1 000", "1000"), ("#### $18.", "18"), ("#### 0.5", "0.5")])
def test_gsm8k_answer(text, expected):
    assert prep.gsm8k_answer(text) == expected


@pytest.mark.parametrize("text", ["72", "#### seventy", "####"])
def test_gsm8k_answer_unusable(text):
    with pytest.raises(prep.Skip):
        prep.gsm8k_answer(text)


def test_detect_shape():
    assert prep.detect_shape(GSM8K[0]) == "gsm8k"
    assert prep.detect_shape(MATH[0]) == "math"
    assert prep.detect_shape(MATH500[0]) == "math"
    assert prep.detect_shape(verl_rows(1)[0]) == "verl"
    assert prep.detect_shape(dapo_rows(DAPO_PROBLEMS[:1])[0]) == "dapo"
    assert prep.detect_shape({"prompt": "p", "answer": "a"}) == "plain"
    assert prep.detect_shape({"text": "t"}) is None


def test_default_eval_out():
    assert prep.default_eval_out("data/math_train.jsonl") == "data/math_test.jsonl"
    assert prep.default_eval_out("data/gsm8k.jsonl") == "data/gsm8k_eval.jsonl"


# ---------------------------------------------------------------------------------------------------
# Each shape end to end, loaded by the trainer's reader


def test_gsm8k_jsonl_subprocess(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "gsm8k_train.jsonl", GSM8K)
    out = tmp_path / "data" / "gsm8k_train.jsonl"
    proc = run_cli(src, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "format gsm8k (detected from" in proc.stdout
    assert "rows read: 3, usable: 3, skipped: 0" in proc.stdout
    assert f"data.train_path={out} data.eval_path=null" in proc.stdout
    records = read_jsonl(out)
    assert records == [{"prompt": r["question"], "answer": a} for r, a in zip(GSM8K, ["72", "62400", "-5"])]
    dataset = load_with_reader(tokenizer, str(out))
    assert [s.answer for s in dataset] == ["72", "62400", "-5"]
    assert dataset.samples[0].prompt_text.startswith("<|bos|><user>Natalia")


def test_math_jsonl_nested_boxed_via_main(tmp_path, capsys, tokenizer):
    src = write_jsonl(tmp_path / "math.jsonl", MATH)
    out = tmp_path / "math_train.jsonl"
    code, stdout, _ = run_main(capsys, src, "--out", out, "--instruction",
                               "Let's think step by step and output the final answer within \\boxed{}.")
    assert code == 0
    assert "format math" in stdout
    records = read_jsonl(out)
    assert [r["answer"] for r in records] == ["\\frac{1}{2}", "3", "\\{0,1\\}"]
    assert records[0]["prompt"] == (MATH[0]["problem"] + " Let's think step by step and output the final answer "
                                    "within \\boxed{}.")
    assert len(load_with_reader(tokenizer, str(out))) == 3


def test_math500_answer_field_wins(tmp_path, capsys, tokenizer):
    src = write_jsonl(tmp_path / "test.jsonl", MATH500)
    out = tmp_path / "math500.jsonl"
    code, _, _ = run_main(capsys, src, "--out", out)
    assert code == 0
    records = read_jsonl(out)
    assert records == [{"prompt": r["problem"], "answer": r["answer"]} for r in MATH500]
    assert [s.answer for s in load_with_reader(tokenizer, str(out))] == ["4", "\\frac{1}{2}"]


def test_verl_parquet_keeps_messages(tmp_path, capsys, tokenizer):
    src = write_parquet(tmp_path / "train.parquet", verl_rows(6))
    out = tmp_path / "verl_train.jsonl"
    code, stdout, _ = run_main(capsys, src, "--out", out, "--instruction", "ignored for messages")
    assert code == 0
    assert "format verl" in stdout and "row 0 (0-based)" in stdout
    assert "prompts are message lists" in stdout and "--instruction was not added to 6" in stdout
    records = read_jsonl(out)
    assert records[3] == {"prompt": [{"role": "system", "content": "You are a careful solver."},
                                     {"role": "user", "content": "What is 3 plus 3? Put the answer in a box."}],
                          "answer": "6"}
    dataset = load_with_reader(tokenizer, str(out))
    assert [s.answer for s in dataset] == [str(2 * i) for i in range(6)]
    assert dataset.samples[1].prompt_text.startswith("<|bos|><system>You are a careful solver.<|end|><user>What is 1")


def test_dapo_parquet_dedup_and_strip_template(tmp_path, capsys, tokenizer):
    src = write_parquet(tmp_path / "dapo-math-17k.parquet", dapo_rows(DAPO_PROBLEMS, repeat=4))
    out = tmp_path / "dapo_all.jsonl"
    code, stdout, _ = run_main(capsys, src, "--out", out)
    assert code == 0
    assert "format dapo" in stdout and "duplicates kept: 9" in stdout and "--dedup drops them" in stdout
    assert len(read_jsonl(out)) == 12
    first = read_jsonl(out)[0]
    assert first["answer"] == "8" and first["prompt"][0]["content"].startswith(prep.DAPO_HEAD)

    deduped = tmp_path / "dapo_train.jsonl"
    code, stdout, _ = run_main(capsys, src, "--out", deduped, "--dedup", "--strip-template",
                               "--instruction", "Put the final answer in \\boxed{}.")
    assert code == 0 and "duplicates dropped: 9" in stdout
    records = read_jsonl(deduped)
    assert records == [{"prompt": f"{p} Put the final answer in \\boxed{{}}.", "answer": a} for p, a in DAPO_PROBLEMS]
    assert [s.answer for s in load_with_reader(tokenizer, str(deduped))] == ["8", "33", "32"]


def test_dapo_split_never_leaks_a_repeated_prompt(tmp_path, capsys):
    src = write_parquet(tmp_path / "dapo.parquet", dapo_rows(DAPO_PROBLEMS, repeat=5))
    code, _, _ = run_main(capsys, src, "--out", tmp_path / "d_train.jsonl", "--split-eval", "1")
    assert code == 0
    train, held = read_jsonl(tmp_path / "d_train.jsonl"), read_jsonl(tmp_path / "d_test.jsonl")
    assert len(held) == 1 and len(train) == 10
    assert held[0]["prompt"] not in [r["prompt"] for r in train]


def test_save_to_disk_folder(tmp_path, capsys, tokenizer):
    folder = tmp_path / "gsm8k_saved"
    if HAVE_DATASETS:
        from datasets import Dataset, DatasetDict

        DatasetDict({"train": Dataset.from_list(GSM8K), "test": Dataset.from_list(GSM8K[:1])}).save_to_disk(str(folder))
        out = tmp_path / "saved_train.jsonl"
        code, stdout, _ = run_main(capsys, folder, "--out", out)
        assert code == 0 and "format gsm8k" in stdout
        assert [r["answer"] for r in read_jsonl(out)] == ["72", "62400", "-5"]
        assert len(load_with_reader(tokenizer, str(out))) == 3
        code, _, err = run_main(capsys, folder, "--out", tmp_path / "v.jsonl", "--split", "validation")
        assert code == 2 and "without the split 'validation'" in err and "train, test" in err
    else:
        folder.mkdir()
        (folder / "dataset_info.json").write_text("{}")
        (folder / "state.json").write_text("{}")
        (folder / "data-00000-of-00001.arrow").write_bytes(b"")
        code, _, err = run_main(capsys, folder, "--out", tmp_path / "saved.jsonl")
        assert code == 2
        assert str(folder) in err and "save_to_disk" in err and "pip install datasets" in err and "to_parquet" in err
        assert not (tmp_path / "saved.jsonl").exists()


def test_json_list_several_inputs_and_limit(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(GSM8K))
    b = write_jsonl(tmp_path / "b.jsonl", MATH)
    out = tmp_path / "mixed.jsonl"
    code, stdout, _ = run_main(capsys, a, b, "--out", out)
    assert code == 0
    assert f"{a}: format gsm8k" in stdout and f"{b}: format math" in stdout
    assert [r["answer"] for r in read_jsonl(out)] == ["72", "62400", "-5", "\\frac{1}{2}", "3", "\\{0,1\\}"]
    code, _, _ = run_main(capsys, a, b, "--out", tmp_path / "four.jsonl", "--limit", "4")
    assert code == 0 and len(read_jsonl(tmp_path / "four.jsonl")) == 4


def test_plain_with_named_fields(tmp_path, capsys):
    src = write_jsonl(tmp_path / "aime.jsonl", [{"id": 1, "Question": "Find 2+2.", "Answer": 4}])
    code, _, err = run_main(capsys, src, "--out", tmp_path / "x.jsonl")
    assert code == 2 and "cannot tell the dataset's shape" in err and "Answer, Question, id" in err
    assert "--prompt-field" in err
    code, _, _ = run_main(capsys, src, "--out", tmp_path / "aime_test.jsonl", "--prompt-field", "Question",
                          "--answer-field", "Answer")
    assert code == 0 and read_jsonl(tmp_path / "aime_test.jsonl") == [{"prompt": "Find 2+2.", "answer": "4"}]


# ---------------------------------------------------------------------------------------------------
# The held-out split


def _many_gsm8k(n):
    return [{"question": f"What is {i} plus one?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(n)]


def test_eval_split_is_deterministic_and_disjoint(tmp_path, capsys, tokenizer):
    src = write_jsonl(tmp_path / "g.jsonl", _many_gsm8k(40))
    outs = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        train, held = tmp_path / run / "math_train.jsonl", tmp_path / run / "math_test.jsonl"
        code, stdout, _ = run_main(capsys, src, "--out", train, "--split-eval", "8", "--seed", seed)
        assert code == 0
        assert f"data.train_path={train} data.eval_path={held}" in stdout  # _train -> _test by default
        outs.append((train.read_text(), held.read_text()))
        train_prompts = {r["prompt"] for r in read_jsonl(train)}
        held_prompts = [r["prompt"] for r in read_jsonl(held)]
        assert len(train_prompts) == 32 and len(held_prompts) == 8 and not train_prompts & set(held_prompts)
    assert outs[0] == outs[1]
    assert outs[0][1] != outs[2][1]
    run_dir = str(tmp_path / "a")
    held = load_with_reader(tokenizer, os.path.join(run_dir, "math_train.jsonl"),
                            os.path.join(run_dir, "math_test.jsonl"), split="eval")
    assert len(held) == 8


def test_eval_split_fraction_and_explicit_path(tmp_path, capsys):
    src = write_jsonl(tmp_path / "g.jsonl", _many_gsm8k(40))
    held = tmp_path / "held.jsonl"
    code, _, _ = run_main(capsys, src, "--out", tmp_path / "t.jsonl", "--split-eval", "0.1", "--eval-out", held)
    assert code == 0 and len(read_jsonl(held)) == 4 and len(read_jsonl(tmp_path / "t.jsonl")) == 36
    code, _, err = run_main(capsys, src, "--out", tmp_path / "t2.jsonl", "--split-eval", "40")
    assert code == 2 and "only 40 distinct" in err
    with pytest.raises(SystemExit) as e:
        prep.main([src, "--out", str(tmp_path / "t3.jsonl"), "--split-eval", "1.5"])
    assert e.value.code == 2
    assert "a share in (0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Skips, thresholds and errors


def _with_bad_rows(n_good, bad):
    return _many_gsm8k(n_good) + bad


BAD_GSM8K = [{"question": "No marker here?", "answer": "42"}, {"question": "Words?", "answer": "#### forty"},
             {"prompt": "wrong shape"}]


def test_skips_counted_and_too_many_fail(tmp_path):
    src = tmp_path / "g.jsonl"
    write_jsonl(src, _with_bad_rows(20, BAD_GSM8K))
    with open(src, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "g_train.jsonl"
    proc = run_cli(src, "--out", out)
    assert proc.returncode == 2
    assert "rows read: 24, usable: 20, skipped: 4" in proc.stdout
    for reason in ("no '#### N' answer: 1", "answer after '####' is not a number: 1", "missing fields: 1",
                   "malformed JSON: 1"):
        assert f"skipped, {reason}" in proc.stdout
    assert f"{src}:21:" in proc.stdout and f"{src}:24:" in proc.stdout  # file and line of the first few
    assert "4 of 24 rows (16.7%) are unusable" in proc.stderr and "--allow-skips" in proc.stderr
    assert not out.exists()

    proc = run_cli(src, "--out", out, "--allow-skips")
    assert proc.returncode == 0 and len(read_jsonl(out)) == 20
    proc = run_cli(src, "--out", tmp_path / "other.jsonl", "--max-skip-share", "0.2")
    assert proc.returncode == 0


def test_few_skips_pass_under_the_threshold(tmp_path, capsys):
    src = write_jsonl(tmp_path / "m.jsonl", MATH * 10 + [{"problem": "No box?", "solution": "It is 3."}])
    code, stdout, _ = run_main(capsys, src, "--out", tmp_path / "m_train.jsonl")
    assert code == 0
    assert "skipped, no \\boxed{} answer: 1" in stdout and f"{src}:31:" in stdout
    assert len(read_jsonl(tmp_path / "m_train.jsonl")) == 30


def test_unknown_format_and_other_errors(tmp_path, capsys):
    src = write_jsonl(tmp_path / "g.jsonl", GSM8K)
    code, _, err = run_main(capsys, src, "--out", tmp_path / "o.jsonl", "--format", "alpaca")
    assert code == 2 and "--format 'alpaca' is not a known format" in err and "gsm8k, math, dapo, verl, plain" in err

    code, _, err = run_main(capsys, tmp_path / "nope.jsonl", "--out", tmp_path / "o.jsonl")
    assert code == 2 and "nope.jsonl: no such file" in err

    (tmp_path / "x.csv").write_text("a,b\n")
    code, _, err = run_main(capsys, tmp_path / "x.csv", "--out", tmp_path / "o.jsonl")
    assert code == 2 and "unknown file type '.csv'" in err

    (tmp_path / "exists.jsonl").write_text("")
    code, _, err = run_main(capsys, src, "--out", tmp_path / "exists.jsonl")
    assert code == 2 and "exists already" in err and "--force" in err
    code, _, _ = run_main(capsys, src, "--out", tmp_path / "exists.jsonl", "--force")
    assert code == 0 and len(read_jsonl(tmp_path / "exists.jsonl")) == 3

    code, _, err = run_main(capsys, src, "--out", src, "--force")
    assert code == 2 and "both an input and an output" in err

    code, _, err = run_main(capsys, src, "--out", tmp_path / "o.jsonl", "--format", "math")
    assert code == 2 and "3 of 3 rows (100.0%) are unusable" in err
    assert not (tmp_path / "o.jsonl").exists()
