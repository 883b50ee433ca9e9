"""Every bad input gives a DataError naming the file and the line (JSONL, 1-based) or row (Parquet, 0-based)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from liteppo_mcore.config.schema import DataConfig, ModelConfig
from liteppo_mcore.data import DataError, build_builtin_tokenizer, build_dataset, load_tokenizer, tokenizer_from_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_builtin_tokenizer()


def write_jsonl(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    return path


def good(prompt="max:123", answer="3"):
    return json.dumps({"prompt": prompt, "answer": answer})


def build(tokenizer, path, **kw):
    return build_dataset(DataConfig(train_path=str(path), **kw), tokenizer, prompt_length=64)


def test_missing_file(tokenizer, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        build(tokenizer, missing)
    message = str(info.value)
    assert "data.train_path" in message and str(missing) in message and "no such file" in message


def test_missing_eval_file_names_the_eval_key(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data.eval_path"):
        build_dataset(DataConfig(eval_path=str(tmp_path / "x.jsonl")), tokenizer, prompt_length=64, split="eval")


def test_directory_instead_of_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        build(tokenizer, tmp_path)


def test_malformed_json_line_names_the_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [good(), good(), '{"prompt": "max:1", "answer": ', good()])
    with pytest.raises(DataError) as info:
        build(tokenizer, path)
    assert f"{path}:3: malformed JSON" in str(info.value)


def test_line_that_is_not_an_object(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [good(), '["max:1", "1"]'])
    with pytest.raises(DataError, match=r"list\.jsonl:2: the line holds a JSON list, not an object"):
        build(tokenizer, path)


def test_non_utf8_bytes_name_the_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "latin1.jsonl", [good(), good(), good(), b'{"prompt": "caf\xe9", "answer": "1"}\n'])
    with pytest.raises(DataError) as info:
        build(tokenizer, path)
    assert f"{path}:4: not valid UTF-8 (byte 0xe9" in str(info.value)


def test_missing_field_names_line_field_and_setting(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "fields.jsonl", [good(), json.dumps({"question": "max:12", "answer": "2"})])
    with pytest.raises(DataError) as info:
        build(tokenizer, path)
    message = str(info.value)
    assert f"{path}:2: missing field 'prompt'" in message
    assert "fields present: answer, question" in message and "data.prompt_key" in message


def test_missing_answer_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "noanswer.jsonl", [json.dumps({"prompt": "max:12"})])
    with pytest.raises(DataError, match=r"noanswer\.jsonl:1: missing field 'answer'.*data\.answer_key"):
        build(tokenizer, path)


def test_wrong_field_types(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "types.jsonl", [json.dumps({"prompt": 12, "answer": "2"})])
    with pytest.raises(DataError, match=r"types\.jsonl:1: field 'prompt' must be a string, got int"):
        build(tokenizer, path)
    path = write_jsonl(tmp_path / "bool.jsonl", [json.dumps({"prompt": "max:1", "answer": True})])
    with pytest.raises(DataError, match=r"bool\.jsonl:1: field 'answer' must be a string, got bool"):
        build(tokenizer, path)


def test_empty_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "empty_prompt.jsonl", [good(), good(prompt="  ")])
    with pytest.raises(DataError, match=r"empty_prompt\.jsonl:2: field 'prompt' is empty"):
        build(tokenizer, path)


def test_empty_file(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match="holds no records"):
        build(tokenizer, path)


def test_unknown_extension_asks_for_the_format(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prompts.txt", [good()])
    with pytest.raises(DataError, match=r"cannot tell the format.*'\.txt'.*data\.format"):
        build(tokenizer, path)
    assert len(build(tokenizer, path, format="jsonl")) == 1


def test_system_key_that_no_record_has(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "nosys.jsonl", [good(), good()])
    with pytest.raises(DataError, match="data.system_key='sys' is set but no record has that field"):
        build(tokenizer, path, system_key="sys")


def test_parquet_missing_field_names_the_row(tokenizer, tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["max:1", "max:2", None], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(DataError) as info:
        build(tokenizer, path)
    assert f"{path} row 2 (0-based): missing field 'prompt'" in str(info.value)


def test_parquet_invalid_utf8_names_the_row(tokenizer, tmp_path):
    # A string column whose third value is not UTF-8 (pyarrow builds it without validating).
    data = b"max:1max:2\xff\xfe"
    offsets = pa.array([0, 5, 10, 12], type=pa.int32()).buffers()[1]
    prompts = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(data)])
    path = tmp_path / "badutf8.parquet"
    pq.write_table(pa.table({"prompt": prompts, "answer": ["1", "2", "3"]}), path)
    expected = r"badutf8\.parquet row 2 \(0-based\): a string column holds bytes that are not valid UTF-8"
    with pytest.raises(DataError, match=expected):
        build(tokenizer, path)


def test_parquet_binary_field_that_is_not_utf8(tokenizer, tmp_path):
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"max:1", b"\xff"], pa.binary()), "answer": ["1", "2"]}), path)
    expected = r"binary\.parquet row 1 \(0-based\): field 'prompt' holds bytes that are not valid UTF-8"
    with pytest.raises(DataError, match=expected):
        build(tokenizer, path)


def test_corrupt_parquet(tokenizer, tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable Parquet file"):
        build(tokenizer, path)


def test_builtin_task_and_file_together(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [good()])
    with pytest.raises(DataError, match="both set"):
        build_dataset(DataConfig(train_path=str(path), builtin_task="max_digit"), tokenizer, prompt_length=64)


def test_unknown_builtin_task_lists_valid_names(tokenizer):
    with pytest.raises(DataError, match=r"data.builtin_task='maxdigit' is not a built-in task. Valid names: max_digit"):
        build_dataset(DataConfig(builtin_task="maxdigit"), tokenizer, prompt_length=64)


def test_no_source_for_a_split(tokenizer):
    with pytest.raises(DataError, match="data.train_path is not set"):
        build_dataset(DataConfig(), tokenizer, prompt_length=64)


def test_tokenizer_directory_missing(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer directory .*absent.* does not exist"):
        load_tokenizer(str(tmp_path / "absent"))


def test_tokenizer_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "readme.txt").write_text("no tokenizer here")
    with pytest.raises(DataError, match="no tokenizer files in this directory"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")  # files, but not a tokenizer transformers can read
    with pytest.raises(DataError, match="cannot load a tokenizer from this directory"):
        load_tokenizer(str(tmp_path))


def test_no_tokenizer_configured():
    with pytest.raises(DataError, match="no tokenizer"):
        tokenizer_from_config(ModelConfig(), DataConfig(train_path="x.jsonl"))


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    from liteppo_mcore.data import load_tokenizer

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match=r"no tokenizer files in this directory .*model.tokenizer_path"):
        load_tokenizer(str(tmp_path))


def test_an_empty_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from liteppo_mcore.data import load_tokenizer

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x"))).save_pretrained(
        str(tmp_path))
    with pytest.raises(DataError, match=r"has 1 tokens .*empty or incomplete"):
        load_tokenizer(str(tmp_path))
