"""common/sequences.py: a row's text is a string, an empty value or a number; anything else is refused by row and field.

Before, a list or a dict in a text field was distilled as its Python repr ("['a', 'b']").
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from common.datasets import DataError
from common.sequences import load_prompts, load_sequences, row_text


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from common.tokenizers import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def test_row_text_reads_strings_numbers_and_empty_values():
    row = {"s": "to be", "i": 42, "f": 3.5, "none": None, "empty": ""}
    assert [row_text(row, f, 0, "--text-field", "d") for f in row] == ["to be", "42", "3.5", "", ""]


@pytest.mark.parametrize("value, kind", [(["a", "b"], "list"), ({"q": "x"}, "dict"), (True, "bool"), (b"x", "bytes")])
def test_row_text_refuses_other_values_naming_row_and_field(value, kind):
    with pytest.raises(DataError) as info:
        row_text({"body": value}, "body", 7, "--text-field", "data.jsonl")
    assert str(info.value).startswith(f"--text-field 'body': row 7 of data.jsonl (counting from 0) holds a {kind}, not "
                                      f"text: {value!r}; every row's 'body' must be a string")


def test_a_list_in_the_text_field_is_refused_not_distilled_as_its_repr(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": None}, {"text": ["to be", "or not"]}, {"text": ["x"]}])
    with pytest.raises(DataError, match=r"--text-field 'text': row 1 of .*d\.jsonl \(counting from 0\) holds a list, "
                                        r"not text: \['to be', 'or not'\]"):
        load_sequences(str(data), tokenizer, max_length=16)


def test_a_dict_in_a_prompt_or_response_field_is_refused(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"q": {"text": "2+2?"}, "a": "4"}])
    with pytest.raises(DataError, match=r"--prompt-field 'q': row 0 of .* holds a dict, not text: \{'text': '2\+2\?'\}"):
        load_sequences(str(data), tokenizer, prompt_field="q", response_field="a", max_length=64)
    data = write_jsonl(tmp_path / "refs.jsonl", [{"q": "2+2?", "a": ["4"]}])
    with pytest.raises(DataError, match=r"--response-field 'a': row 0 of .* holds a list"):
        load_prompts(str(data), tokenizer, prompt_field="q", response_field="a", max_length=64)
    data = write_jsonl(tmp_path / "inputs.jsonl", [{"q": "sum", "a": "4", "c": [2, 2]}])
    with pytest.raises(DataError, match=r"--input-field 'c': row 0 of .* holds a list"):
        load_sequences(str(data), tokenizer, prompt_field="q", response_field="a", input_field="c",
                       prompt_template="minillm", max_length=64)


def test_numbers_are_read_as_their_text(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "n.jsonl", [{"q": "2+2?", "a": 4}, {"q": "5+5?", "a": 10}])
    sequences, _ = load_sequences(str(data), tokenizer, prompt_field="q", response_field="a", max_length=64)
    assert [s.reference for s in sequences] == ["4", "10"]


def test_kdcache_build_refuses_a_list_text_and_writes_nothing(tmp_path, tiny_gpt2_dir):
    from cli.kdcache import app

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": ["to be", "or not"]}])
    res = CliRunner().invoke(app, ["build", "--model", str(tiny_gpt2_dir), "--dataset", str(data),
                                   "--out", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert "error: --text-field 'text': row 0 of " in res.output and "holds a list, not text" in " ".join(res.output.split())
    assert not (tmp_path / "cache").exists()
