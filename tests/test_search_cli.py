"""`supernet search` on a trained tiny run: files, final evaluation, resume, 2 processes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from supernet.cli import main
from supernet.search import non_dominated


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bert_dir, tiny_csv):
    """A short NLS run on the tiny BERT (3 choices in 8 groups)."""
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--model", str(tiny_bert_dir), "--dataset", str(tiny_csv), "--text-column", "sentence",
                 "--label-column", "sentiment", "--ranks", "8,6,4", "--max-steps", "12", "--batch-size", "8",
                 "--eval-every", "12", "--save-every", "12", "--eval-samples", "16", "--max-length", "16",
                 "--lr", "1e-2", "--out", str(out), "--name", "run"])
    assert code == 0
    return out / "run"


SMALL = ["--population", "4", "--evaluations", "10", "--eval-samples", "24"]


def test_search_writes_history_front_and_final_evaluation(capsys, trained_run):
    code, out, err = cli(capsys, "search", "--run", trained_run, "--objectives", "acc,macs", *SMALL, "--name", "a")
    assert code == 0, err
    shown = err
    summary = json.loads(out.strip().splitlines()[-1])
    d = trained_run / "search" / "a"
    assert summary["search"] == str(d) and summary["evaluations"] == 10
    history = pd.read_csv(d / "history.csv")
    pareto = pd.read_csv(d / "pareto.csv")
    assert len(history) == 10 and history["config"].is_unique
    # the search's front (the non-dominated rows of history.csv) and the rows it beats within the noise
    # were re-scored on the whole validation split; pareto.csv is the non-dominated set of those scores
    mask = non_dominated(history[["obj_acc", "obj_macs"]].to_numpy())
    searched = set(history.loc[mask, "index"])
    rescored = pd.read_csv(d / "rescored.csv")
    assert searched <= set(rescored["index"]) and set(rescored["index"]) <= set(history["index"])
    from supernet.fidelity import accuracy_interval

    members = history[history["index"].isin(searched)]
    for row in history.itertuples():  # re-scored: the members, and each row a member beats within the noise
        beats = (members["obj_acc"] <= row.obj_acc) & (members["obj_macs"] <= row.obj_macs) & (
            (members["obj_acc"] < row.obj_acc) | (members["obj_macs"] < row.obj_macs))
        near = [accuracy_interval(row.accuracy, 24)[1] >= accuracy_interval(a, 24)[0] for a in members["accuracy"]]
        expected = row.index in searched or bool((beats & np.array(near)).any())
        assert (row.index in set(rescored["index"])) == expected
    confirmed = non_dominated(np.column_stack([-rescored["val_accuracy"], rescored["obj_macs"]]))
    assert sorted(rescored.loc[confirmed, "index"]) == sorted(pareto["index"])
    status = dict(zip(rescored["index"], rescored["status"], strict=True))
    assert all(status[i] in ("kept", "promoted") for i in pareto["index"])
    assert {i for i, s in status.items() if s in ("kept", "demoted")} == searched
    assert summary["confirmation"]["rescored"] == len(rescored)
    assert sorted(int(p.stem) for p in (d / "subnets").glob("*.json")) == sorted(pareto["index"])
    # final evaluation on the whole validation and test splits (40 and 80 examples of the tiny CSV)
    assert (pareto["val_examples"] == 40).all() and (pareto["test_examples"] == 80).all()
    assert pareto["test_accuracy"].between(0, 1).all() and pareto["test_accuracy"].nunique() >= 1
    # every accuracy with its 95% Wilson interval on the examples it was measured on
    from scipy.stats import binomtest

    for col, n in (("accuracy", 24), ("val_accuracy", 40), ("test_accuracy", 80)):
        for acc, low, high in zip(pareto[col], pareto[f"{col}_low"], pareto[f"{col}_high"], strict=True):
            ref = binomtest(round(acc * n), n).proportion_ci(method="wilson")
            assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-6)  # accuracies are float32
    assert "95% intervals" in shown and "evaluation noise" in shown
    for i in pareto["index"]:
        sub = json.loads((d / "subnets" / f"{i}.json").read_text())
        assert set(sub["final"]) >= {"val_accuracy", "test_accuracy"}
        # a front member's validation accuracy reproduces through `supernet eval`
        code, line, err = cli(capsys, "eval", "--run", trained_run, "--subnet", d / "subnets" / f"{i}.json",
                              "--split", "test")
        assert code == 0, err
        assert json.loads(line)["accuracy"] == pytest.approx(sub["final"]["test_accuracy"], abs=1e-9)
    assert "Pareto front" in shown and str(d) in shown


def test_final_samples_re_score_the_front_on_the_first_examples(capsys, trained_run):
    args = ["search", "--run", trained_run, "--objectives", "acc,macs", *SMALL, "--name", "f", "--final-samples", "8"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    d = trained_run / "search" / "f"
    pareto = pd.read_csv(d / "pareto.csv")
    assert (pareto["val_examples"] == 8).all() and (pareto["test_examples"] == 8).all()
    assert json.loads((d / "search.json").read_text())["settings"]["extra"]["final_samples"] == 8
    i = int(pareto["index"].iloc[0])
    code, line, err = cli(capsys, "eval", "--run", trained_run, "--subnet", d / "subnets" / f"{i}.json",
                          "--split", "test", "--limit", "8")
    assert code == 0, err
    assert json.loads(line)["accuracy"] == pytest.approx(pareto["test_accuracy"].iloc[0], abs=1e-9)


def test_search_resume_and_name_rules(capsys, trained_run):
    args = ["search", "--run", trained_run, "--objectives", "acc,params", *SMALL, "--name", "r", "--seed", "1"]
    assert cli(capsys, *args)[0] == 0
    first = (trained_run / "search" / "r" / "history.csv").read_text()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "--resume" in err
    code, out, err = cli(capsys, "search", "--run", trained_run, "--name", "r", "--resume")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["evaluated_now"] == 0  # everything came from the cache
    assert (trained_run / "search" / "r" / "history.csv").read_text() == first
    code, _, err = cli(capsys, "search", "--run", trained_run, "--objectives", "acc,macs", *SMALL, "--name", "r")
    assert code == 2 and "different settings" in err


BAD = [
    (["--objectives", "acc,colour"], "unknown objective"),
    (["--objectives", "acc"], "two"),
    (["--algorithm", "annealing"], "unknown algorithm"),
    (["--population", "1"], "population"),
    (["--population", "8", "--evaluations", "4"], "at least the population"),
    (["--constraint", "macs<<3"], "constraint"),
    (["--algorithm", "allocator", "--budget", "flops=3"], "budget"),
    (["--algorithm", "allocator", "--budget", "macs=10"], "budget"),
    (["--algorithm", "grid", "--evaluations", "16"], "grid"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--final-samples", "-3"], "--final-samples"),
    (["--resume", "--name", "a", "--final-samples", "8"], "saved settings"),
    (["--name", "../x"], "one plain folder name"),
    (["--resume", "--name", "nothing-here"], "no search to resume"),
    (["--resume"], "--name"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_search_input(capsys, trained_run, extra, message):
    before = sorted(p.name for p in (trained_run / "search").iterdir()) if (trained_run / "search").exists() else []
    argv = ["search", "--run", trained_run, *extra]
    if "--resume" not in extra:
        argv = [*argv, "--population", "4"] if "--population" not in extra else argv
    code, _, err = cli(capsys, *argv)
    assert code == 2 and err.startswith("supernet: error:") and err.count("\n") == 1 and message in err, err
    after = sorted(p.name for p in (trained_run / "search").iterdir()) if (trained_run / "search").exists() else []
    assert after == before


def test_search_of_a_run_without_weights(capsys, trained_run, tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text((trained_run / "config.json").read_text())
    code, _, err = cli(capsys, "search", "--run", empty, *SMALL)
    assert code == 2 and "no weights" in err and not (empty / "search").exists()


def test_two_process_search_equals_one_process(capsys, trained_run):
    """2 CPU processes (gloo, accelerate's launcher): each generation is split and gathered; same history.

    (torchrun's own parser takes ``--run`` for an abbreviation of its ``--run-path``, so the
    multi-process search is launched through accelerate, as the README says.)"""
    args = ["--run", str(trained_run), "--objectives", "acc,macs", "--population", "4", "--evaluations", "12",
            "--eval-samples", "24", "--seed", "5"]
    assert cli(capsys, "search", *args, "--name", "one")[0] == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "supernet", "search", *args, "--name", "two"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["processes"] == 2
    one = pd.read_csv(trained_run / "search" / "one" / "history.csv")
    two = pd.read_csv(trained_run / "search" / "two" / "history.csv")
    assert list(one["config"]) == list(two["config"]) and list(one["generation"]) == list(two["generation"])
    pd.testing.assert_series_equal(one["accuracy"], two["accuracy"])
    pd.testing.assert_series_equal(one["loss"], two["loss"], atol=1e-5, rtol=1e-5)
    assert not any(p.name.startswith("supernet-search-") for p in (trained_run / "search").iterdir())


# ------------------------------------------------------------------------------------ export
def _logits_of_run(trained_run, config, ids, mask):
    import torch

    from supernet.loader import load_run

    setup, _ = load_run(trained_run)
    setup.net.activate(config)
    setup.net.model.eval()
    with torch.no_grad():
        return setup.net.model(input_ids=ids, attention_mask=mask).logits


def test_export_merged_and_peft_match_the_supernetwork(capsys, trained_run, tiny_bert_dir, tmp_path):
    """super-network at a config == reloaded merged export == base + reloaded PEFT adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (trained_run / "search" / "a").exists():
        assert cli(capsys, "search", "--run", trained_run, *SMALL, "--name", "a")[0] == 0
    sub = sorted((trained_run / "search" / "a" / "subnets").glob("*.json"))[0]
    config = json.loads(sub.read_text())["config"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok(["good fun movie", "awful dull plot and cast", "the cast"], padding=True, return_tensors="pt")
    ref = _logits_of_run(trained_run, config, enc["input_ids"], enc["attention_mask"])

    code, out, err = cli(capsys, "export", "--run", trained_run, "--subnet", sub, "--format", "merged",
                         "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k or ".base." in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, ref, atol=1e-5, rtol=1e-4)
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["config"] == config and manifest["macs"] < json.loads(
        (trained_run / "config.json").read_text())["macs"]["min"]  # merged adapters cost nothing

    code, out, err = cli(capsys, "export", "--run", trained_run, "--subnet", sub, "--format", "peft",
                         "--out", tmp_path / "peft")
    assert code == 0, err
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(**enc).logits, ref, atol=1e-5, rtol=1e-4)
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(adapter_config["rank_pattern"].values()) == set(config.values())


def test_export_pareto_and_best(capsys, trained_run, tmp_path):
    if not (trained_run / "search" / "a").exists():
        assert cli(capsys, "search", "--run", trained_run, *SMALL, "--name", "a")[0] == 0
    front = pd.read_csv(trained_run / "search" / "a" / "pareto.csv")
    code, out, err = cli(capsys, "export", "--run", trained_run, "--pareto", "--search", "a", "--format", "peft",
                         "--out", tmp_path / "front")
    assert code == 0, err
    index = pd.read_csv(tmp_path / "front" / "index.csv")
    assert sorted(index["name"]) == sorted(front["index"]) and len(list((tmp_path / "front").iterdir())) == len(
        front) + 2  # the members, index.csv and manifest.json
    limit = float(front["macs"].median())
    code, out, err = cli(capsys, "export", "--run", trained_run, "--subnet", "best", "--search", "a",
                         "--constraint", f"macs<={limit}", "--out", tmp_path / "best")
    assert code == 0, err
    chosen = json.loads((tmp_path / "best" / "manifest.json").read_text())
    ok = front[front["macs"] <= limit]
    best = ok.sort_values(["val_accuracy", "index"], ascending=[False, True]).iloc[0]
    assert chosen["config"] == json.loads(best["config"]) and chosen["macs"] <= limit


def test_bad_export_input(capsys, trained_run, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"L0.qkv": 5}))
    cases = [
        (["--subnet", "max", "--out", foreign], "not a supernet export"),
        (["--subnet", wrong, "--out", tmp_path / "w"], "lacks groups"),
        (["--subnet", "max", "--pareto"], "either --subnet"),
        (["--pareto", "--search", "nope"], "no finished search"),
        (["--subnet", "max", "--constraint", "macs<=1"], "--subnet best"),
        (["--subnet", "best", "--search", "a", "--constraint", "macs<=1"], "no front member"),
        (["--subnet", "max", "--format", "onnx"], "invalid choice"),
        (["--subnet", "max", "--format", "peft", "--peft-scale", "global"], "invalid choice"),
        (["--subnet", "max", "--peft-scale", "folded", "--out", tmp_path / "w"], "an option of --format peft"),
        (["--subnet", "max", "--format", "peft", "--sparse-storage", "bitmask", "--out", tmp_path / "w"],
         "an option of --format compressed"),
    ]
    for extra, message in cases:
        code, _, err = cli(capsys, "export", "--run", trained_run, *extra)
        assert code == 2 and err.startswith("supernet: error:") and err.count("\n") == 1 and message in err, err
    assert (foreign / "keep.txt").read_text() == "mine" and not (tmp_path / "w").exists()


def test_halving_through_the_cli_scores_lower_rungs_on_fewer_examples(capsys, trained_run):
    code, out, err = cli(capsys, "search", "--run", trained_run, "--objectives", "acc,macs", "--algorithm", "halving",
                         "--evaluations", "6", "--eval-samples", "27", "--population", "4", "--name", "h")
    assert code == 0, err
    d = trained_run / "search" / "h"
    rungs = pd.read_csv(d / "rungs.csv")
    assert rungs.groupby("rung")["examples"].agg(["first", "size"]).values.tolist() == [[3, 18], [9, 6]]
    history = pd.read_csv(d / "history.csv")
    assert len(history) == 2 and set(history["config"]) <= set(rungs.loc[rungs["rung"] == 1, "config"])
    # a rung's accuracy is that of `supernet eval --limit` on as many validation examples
    row = rungs.iloc[0]
    (d.parent / "one.json").write_text(row["config"])
    code, line, err = cli(capsys, "eval", "--run", trained_run, "--subnet", d.parent / "one.json", "--split",
                          "validation", "--limit", "3")
    assert code == 0, err
    assert json.loads(line)["accuracy"] == pytest.approx(json.loads(row["metrics"])["accuracy"], abs=1e-6)
