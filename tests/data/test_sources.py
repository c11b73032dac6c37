"""Sources: plain text, JSONL, parquet, globs in a fixed order, errors that name the file and line."""

import json

import pytest

from minimax_jax.data.corpus import STDLIB_MODULE_FILES, builtin_corpus_documents, builtin_corpus_files
from minimax_jax.data.sources import read_documents, resolve_paths


def test_plain_text_and_separator(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("one<SEP>two<SEP><SEP>thrée", encoding="utf-8")
    assert read_documents([str(tmp_path / "a.txt")]) == ["first file\n"]
    assert read_documents([str(tmp_path / "b.txt")], text_separator="<SEP>") == ["one", "two", "thrée"]


def test_globs_are_sorted_and_patterns_keep_their_order(tmp_path):
    for name in ("c.txt", "a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("z")
    patterns = [str(tmp_path / "sub" / "z.txt"), str(tmp_path / "*.txt")]
    assert read_documents(patterns) == ["z", "a.txt", "b.txt", "c.txt"]
    assert [p.name for p in resolve_paths([str(tmp_path / "**" / "*.txt")])] == ["a.txt", "b.txt", "c.txt", "z.txt"]


def test_jsonl_field_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": "héllo", "id": 1}, {"content": "x", "text": "world"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert read_documents([str(path)]) == ["héllo", "world"]  # the empty document is skipped
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "b1"}\n{"body": "b2"}\n')
    assert read_documents([str(other)], text_field="body") == ["b1", "b2"]


def test_missing_file_and_empty_glob_are_named(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents([missing])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.jsonl"):
        read_documents([str(tmp_path / "nothing-*.jsonl")])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"body": "no text field"}', "data.jsonl:2: JSONL record has no field 'text'"),
        ('["a list"]', "data.jsonl:2: JSONL record has no field 'text'"),
        ('{"text": 3}', "data.jsonl:2: field 'text' is int, not a string"),
        ("{not json", "data.jsonl:2: invalid JSON"),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_documents([str(path)])


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["doc one", "", "doc twö"], "n": [1, 2, 3]}), path)
    assert read_documents([str(path)]) == ["doc one", "doc twö"]
    with pytest.raises(ValueError, match="no column 'body'"):
        read_documents([str(path)], text_field="body")


def test_builtin_corpus_is_deterministic_and_small():
    files = builtin_corpus_files()
    assert len(files) >= len(STDLIB_MODULE_FILES) // 2  # a trimmed install may lack a few
    documents = builtin_corpus_documents()
    assert documents == builtin_corpus_documents()
    total = sum(len(d) for d in documents)
    assert len(documents) > 100 and 100_000 < total < 5_000_000
    assert all(d and d == d.strip() for d in documents)
    assert any(d.startswith("def ") for d in documents) and any(d.startswith("class ") for d in documents)


def test_builtin_corpus_needs_some_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in corpus"):
        builtin_corpus_files(tmp_path)
