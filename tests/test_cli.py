"""CLI wiring and every bad input: one line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from supernet.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_eval(capsys, tiny_train_args, tmp_path):
    code, out, err = run_cli(capsys, "train", *tiny_train_args, "--name", "a")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    run = tmp_path / "runs" / "a"
    assert summary["steps"] == 6 and summary["run"] == str(run)
    for f in ("config.json", "adapter.safetensors", "train_log.csv", "eval_log.csv", "summary.json"):
        assert (run / f).is_file(), f
    record = json.loads((run / "config.json").read_text())
    assert record["train"]["ranks"] == [8, 6, 4] and record["label_names"] == ["no", "yes"]
    assert record["macs"]["max"] > record["macs"]["mid"] > record["macs"]["min"]

    preds = tmp_path / "preds.csv"
    code, out, err = run_cli(capsys, "eval", "--run", str(run), "--subnet", "min", "--split", "test",
                             "--predictions", str(preds))
    assert code == 0, err
    line = json.loads(out)
    assert set(line) >= {"accuracy", "loss", "macs", "trainable_params", "examples", "config"}
    assert line["macs"] == record["macs"]["min"]
    assert line["trainable_params"] == record["trainable_params"]["min"]
    df = pd.read_csv(preds)
    assert len(df) == line["examples"] and {"label", "prediction", "logit_no", "logit_yes"} <= set(df.columns)
    assert (df["label"] == df["prediction"]).mean() == pytest.approx(line["accuracy"])
    from scipy.stats import binomtest

    ref = binomtest(int((df["label"] == df["prediction"]).sum()), len(df)).proportion_ci(method="wilson")
    assert (line["accuracy_low"], line["accuracy_high"]) == pytest.approx((ref.low, ref.high), abs=1e-9)

    sub = tmp_path / "sub.json"
    sub.write_text(json.dumps(record["choices"] and {g: c[-1] for g, c in record["choices"].items()}))
    code, out, _ = run_cli(capsys, "eval", "--run", str(run), "--subnet", str(sub), "--split", "test")
    assert code == 0 and json.loads(out)["accuracy"] == line["accuracy"]

    # the same run again needs --resume, --overwrite or a new name
    code, _, err = run_cli(capsys, "train", *tiny_train_args, "--name", "a")
    assert code == 2 and "exists" in err
    # resume a finished run with more steps
    code, out, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "8")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 8


def test_yaml_config_and_flag_override(capsys, tiny_train_args, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("max-steps: 3\nranks: [6, 2]\nseed: 5\n")
    code, out, err = run_cli(capsys, "train", "--config", str(cfg), *tiny_train_args[:8], "--batch-size", "8",
                             "--max-length", "16", "--eval-every", "3", "--out", str(tmp_path / "runs"),
                             "--name", "y", "--max-steps", "2")
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "y" / "config.json").read_text())
    assert record["train"]["ranks"] == [6, 2] and record["train"]["seed"] == 5
    assert record["train"]["max_steps"] == 2  # the flag wins over the file


def test_yaml_types_are_checked(capsys, tiny_train_args, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 5e-4\nmixed-precision: no\nmax-steps: 2\n")  # YAML: a string and a boolean
    code, _, err = run_cli(capsys, "train", "--config", str(cfg), *tiny_train_args[:8], "--out",
                           str(tmp_path / "runs"), "--name", "types", "--max-length", "16")
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "types" / "config.json").read_text())
    assert record["train"]["lr"] == 5e-4 and record["train"]["mixed_precision"] == "no"
    for bad, message in [("ranks: 32\n", "wrong type"), ("alpha: [1]\n", "wrong type"), ("seed: -1\n", ">= 0"),
                         ("max-grad-norm: -1\n", "positive"), ("colour: red\n", "unknown training option"),
                         ("- a list\n", "mapping")]:
        cfg.write_text(bad)
        code, _, err = run_cli(capsys, "train", "--config", str(cfg), *tiny_train_args[:8], "--name", "t2",
                               "--out", str(tmp_path / "runs"))
        assert code == 2 and message in err and err.count("\n") == 1, (bad, err)
        assert not (tmp_path / "runs" / "t2").exists()


def test_resume_of_a_broken_checkpoint(capsys, tiny_train_args, tmp_path):
    assert run_cli(capsys, "train", *tiny_train_args, "--name", "r")[0] == 0
    run = tmp_path / "runs" / "r"
    (run / "checkpoint" / "optimizer.pt").write_bytes(b"truncated")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--max-steps", "9")
    assert code == 2 and "corrupt" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--lr", "0.1")
    assert code == 2 and "only --max-steps" in err
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tiny_train_args, tmp_path):
    precious = tmp_path / "runs" / "src"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", *tiny_train_args, "--name", "src", "--overwrite")
    assert code == 2 and "not a supernet run" in err
    assert (precious / "keep.txt").read_text() == "mine"


BAD_TRAIN = [
    (["--model", "/no/such/model-dir"], "cannot load model"),
    (["--dataset", "no-such-dataset-xyz"], "unknown dataset"),
    (["--target-modules", "nothing_matches"], "match no linear module"),
    (["--ranks", "0,4"], "positive"),
    (["--ranks", "4096"], "exceeds the size"),
    (["--ranks", ""], "empty"),
    (["--ranks", "a,b"], "integers"),
    (["--text-column", "nope"], "no column"),
    (["--max-steps", "0"], "positive"),
    (["--scaling", "cubic"], "invalid choice"),
    (["--max-steps", "many"], "invalid int"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_TRAIN)
def test_bad_train_input(capsys, tiny_train_args, tmp_path, extra, message):
    code, out, err = run_cli(capsys, "train", *tiny_train_args, "--name", "bad", *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("supernet: error:") and message in err, err
    assert not (tmp_path / "runs" / "bad").exists()


def test_groups_file_naming_no_module(capsys, tiny_train_args, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"attn": ["query", "key", "value"], "ghost": ["no_such_proj"]}))
    code, _, err = run_cli(capsys, "train", *tiny_train_args, "--name", "g", "--groups", str(groups))
    assert code == 2 and "names no target module" in err
    groups.write_text("{not json")
    code, _, err = run_cli(capsys, "train", *tiny_train_args, "--name", "g", "--groups", str(groups))
    assert code == 2 and "not valid JSON" in err
    assert not (tmp_path / "runs" / "g").exists()


def test_bad_eval_input(capsys, tiny_train_args, tmp_path):
    assert run_cli(capsys, "train", *tiny_train_args, "--name", "e", "--max-steps", "1")[0] == 0
    run = tmp_path / "runs" / "e"
    record = json.loads((run / "config.json").read_text())
    cases = []
    wrong_group = tmp_path / "wrong_group.json"
    wrong_group.write_text(json.dumps({"nope": 8}))
    cases.append((["--run", str(run), "--subnet", str(wrong_group)], "does not have"))
    wrong_rank = tmp_path / "wrong_rank.json"
    wrong_rank.write_text(json.dumps({g: 5 for g in record["choices"]}))
    cases.append((["--run", str(run), "--subnet", str(wrong_rank)], "not one of"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    cases.append((["--run", str(run), "--subnet", str(broken)], "not valid JSON"))
    cases.append((["--run", str(run), "--subnet", "largest"], "does not exist"))
    cases.append((["--run", str(tmp_path / "missing")], "does not exist"))
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases.append((["--run", str(empty)], "not a supernet run"))
    corrupt = tmp_path / "corrupt-run"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("garbage")
    cases.append((["--run", str(corrupt)], "corrupt"))
    for argv, message in cases:
        code, _, err = run_cli(capsys, "eval", *argv)
        assert code == 2 and err.startswith("supernet: error:") and message in err, (argv, err)
        assert err.count("\n") == 1
    (run / "adapter.safetensors").write_bytes(b"not safetensors")
    code, _, err = run_cli(capsys, "eval", "--run", str(run))
    assert code == 2 and "cannot read weights" in err and err.count("\n") == 1


def test_subprocess_error_is_one_line_without_traceback(tiny_train_args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "supernet", "train", *tiny_train_args, "--ranks", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("supernet: error:")
