"""A run folder written before typed dimensions and adapter kinds (commit c2bdcfb, frozen in
tests/fixtures/old_run by tests/fixtures/make_old_run.py) still loads, evaluates, searches,
exports and plots, with the numbers that code gave."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_run"


@pytest.fixture
def old_run(tmp_path, tiny_bert_dir, signal_csv) -> Path:
    """The frozen folder, pointed at this session's tiny model and data (rebuilt exactly as the
    generator built them: conftest's seeded ``tiny_bert_dir`` and ``signal_csv``)."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURE / "run", run)
    record = json.loads((run / "config.json").read_text())
    record["train"].update(model=str(tiny_bert_dir), dataset=str(signal_csv))
    (run / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    return run


def test_old_run_evaluates_with_the_same_numbers(capsys, old_run):
    expected = json.loads((FIXTURE / "expected.json").read_text())["eval"]
    for name, want in expected.items():
        code, out, err = cli(capsys, "eval", "--run", old_run, "--subnet", name, "--split", "test")
        assert code == 0, err
        got = json.loads(out)
        for key in ("macs", "trainable_params", "size", "examples", "config", "accuracy"):
            assert got[key] == want[key], (name, key)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)


def test_old_search_resumes_without_evaluating_and_keeps_its_front(capsys, old_run):
    search = old_run / "search" / "s"
    history, pareto = (search / "history.csv").read_bytes(), pd.read_csv(search / "pareto.csv")
    code, out, err = cli(capsys, "search", "--run", old_run, "--name", "s", "--resume")
    assert code == 0, err
    assert (search / "history.csv").read_bytes() == history
    again = pd.read_csv(search / "pareto.csv")
    assert again["config"].tolist() == pareto["config"].tolist()
    assert again["accuracy"].tolist() == pareto["accuracy"].tolist()
    assert again["macs"].tolist() == pareto["macs"].tolist()


def test_old_run_searches_exports_and_plots(capsys, old_run, tmp_path):
    code, _, err = cli(capsys, "search", "--run", old_run, "--algorithm", "midpoint", "--objectives", "acc,params",
                       "--eval-samples", "16", "--name", "m")
    assert code == 0, err
    for fmt in ("merged", "peft"):
        code, out, err = cli(capsys, "export", "--run", old_run, "--subnet", "best", "--search", "s", "--format", fmt,
                             "--out", tmp_path / fmt)
        assert code == 0, err
        manifest = json.loads((tmp_path / fmt / "manifest.json").read_text())
        best = json.loads(next((old_run / "search" / "s" / "subnets").glob("*.json")).read_text())
        assert manifest["config"] == best["config"]
    code, _, err = cli(capsys, "plot", "--run", old_run, "--out", tmp_path / "plots")
    assert code == 0, err
    assert list((tmp_path / "plots").glob("*.png"))
