"""Data loading: built-ins with fixed splits, local files of every format, label handling."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from supernet.data import load_task_data
from supernet.errors import SupernetError


def test_rotten_tomatoes_fixed_split():
    a = load_task_data("rotten-tomatoes")
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 8965, "validation": 1281, "test": 2562}
    assert a.label_names == ["fresh", "rotten"] and a.answer_words() == [" positive", " negative"]
    b = load_task_data("rotten-tomatoes")
    assert a.splits["test"]["text"][:5] == b.splits["test"]["text"][:5]
    assert not set(a.splits["test"]["text"][:200]) & set(a.splits["train"]["text"])


def test_sms_spam():
    d = load_task_data("sms-spam")
    assert sum(len(v) for v in d.splits.values()) == 4837
    assert d.label_names == ["ham", "spam"]
    assert sum(sum(v["label"]) for v in d.splits.values()) == 638


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_local_files_with_integer_labels(tmp_path, fmt):
    df = pd.DataFrame({"body": [f"text {i}" for i in range(50)], "y": [i % 3 for i in range(50)]})
    p = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(p, index=False)
    elif fmt == "tsv":
        df.to_csv(p, sep="\t", index=False)
    elif fmt == "json":
        p.write_text(json.dumps(df.to_dict(orient="records")))
    elif fmt == "jsonl":
        df.to_json(p, orient="records", lines=True)
    else:
        df.to_parquet(p)
    d = load_task_data(str(p), text_column="body", label_column="y")
    assert d.label_names == ["0", "1", "2"]
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 35, "validation": 5, "test": 10}
    row = d.splits["train"][0]
    assert row["label"] == int(row["text"].split()[1]) % 3


def test_string_labels_sorted(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"] * 5, "label": ["neg", "pos", "neutral", "pos"] * 5}).to_csv(p)
    d = load_task_data(str(p))
    assert d.label_names == ["neg", "neutral", "pos"]


def test_errors(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a", "b"] * 10, "label": [0, 1] * 10}).to_csv(p)
    with pytest.raises(SupernetError, match="no column 'sentence'"):
        load_task_data(str(p), text_column="sentence")
    with pytest.raises(SupernetError, match="unknown dataset"):
        load_task_data("no-such-dataset-anywhere")
    bad = tmp_path / "d.txt"
    bad.write_text("x")
    with pytest.raises(SupernetError, match="use a .csv"):
        load_task_data(str(bad))
    one = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a"] * 10, "label": [1] * 10}).to_csv(one)
    with pytest.raises(SupernetError, match="fewer than two labels"):
        load_task_data(str(one))


def test_choice_labels_by_index(tmp_path):
    p = tmp_path / "mc.jsonl"
    rows = [{"q": f"q{i}", "opts": ["x", "y", "z"], "gold": i % 3} for i in range(30)]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    d = load_task_data(str(p), text_column="q", label_column="gold", choices_column="opts")
    assert d.has_choices and d.label_names == ["0", "1", "2"]
    r = d.splits["train"][0]
    assert r["choices"] == ["x", "y", "z"] and r["label"] == int(r["text"][1:]) % 3
    rows[0]["gold"] = 7
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(SupernetError, match="not a valid choice index"):
        load_task_data(str(p), text_column="q", label_column="gold", choices_column="opts")
