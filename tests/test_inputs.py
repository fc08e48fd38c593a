"""Hostile input, one class at a time: options, paths, files, datasets, damaged runs, crash windows.

Every case ends as a correct run or as exactly one line ``supernet: error: ...`` with exit
code 2 and nothing written; nothing supernet did not create is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli

from supernet import files, runfiles
from supernet.errors import SupernetError
from supernet.train import TrainConfig, resume, train


def tiny_cfg(tiny_bert_dir, tiny_csv, out, **kw):
    base = dict(model=str(tiny_bert_dir), dataset=str(tiny_csv), text_column="sentence", label_column="sentiment",
                ranks=[8, 6, 4], batch_size=8, max_length=16, eval_samples=16, eval_every=4, save_every=4,
                max_steps=8, lr=1e-2, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------ options
BAD_OPTIONS = [
    (["--alpha", "nan"], "finite"),
    (["--lr", "inf"], "finite"),
    (["--lr", "nan"], "finite"),
    (["--max-grad-norm", "nan"], "finite"),
    (["--weight-decay", "nan"], "finite"),
    (["--warmup-ratio", "1"], "below 1"),
    (["--dropout", "-0.1"], ">= 0"),
    (["--seed", "4294967296"], "<= 4.29497e+09"),
    (["--seed", "-1"], ">= 0"),
    (["--max-length", "100000"], "exceeds the 128 positions"),
    (["--target-modules", "re:("], "not a valid regular expression"),
    (["--target-modules", ","], "empty"),
    (["--prompt", "Review: {text} {label}"], "placeholder {label}"),
    (["--prompt", "Review: {text"], "not a valid template"),
    (["--task", "causal-lm"], "encoder"),
    (["--name", "../../escape"], "one plain folder name"),
    (["--name", "/abs/path"], "one plain folder name"),
    (["--name", ""], "empty"),
    (["--name", ".."], "one plain folder name"),
    # the compressed base (supernet.compressed_base.Compression and TrainConfig)
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--sparsity", "-0.1"], "[0, 1)"),
    (["--sparsity", "nan"], "finite"),
    (["--pattern", "4:4"], "N must be below M"),
    (["--pattern", "two:four"], "unstructured or N:M"),
    (["--pattern", "3:5"], "not divisible by 5"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "removes 0.5"),
    (["--bits", "3"], "4 or 8"),
    (["--bits", "4", "--group-size", "24"], "does not divide the width 32"),
    (["--bits", "4", "--group-size", "0"], "positive"),
    (["--adapter-merge", "qa-sparse", "--sparsity", "0.5"], "needs --bits"),
    (["--adapter-merge", "sparse"], "needs --sparsity"),
    (["--adapter-merge", "sparse", "--sparsity", "0.5", "--bits", "4", "--group-size", "16"], "leave its grid"),
    (["--adapter-merge", "sparse", "--sparsity", "0.5", "--dropout", "0.1"], "--dropout needs"),
    (["--sparsity", "0.5", "--calibration-samples", "0"], "positive"),
    (["--sparsity", "0.5", "--calibration-samples", "100000"], "exceeds the 280 examples"),
    (["--prune", "random"], "invalid choice"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_OPTIONS)
def test_bad_options(capsys, tiny_train_args, tmp_path, extra, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "bad", *extra)
    if extra[0] == "--name":  # the last --name wins
        code, _, err = cli(capsys, "train", *tiny_train_args, *extra)
    assert_refused(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_options_file_classes(capsys, tiny_train_args, tmp_path):
    """A binary or non-mapping --config and a malformed groups file, each one line."""
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert_refused(*cli(capsys, "train", "--config", binary, *tiny_train_args)[::2], "binary")
    groups = tmp_path / "groups.json"
    for content, message in [(b"\x00\x01\x02", "binary"), (json.dumps({"a": [1, 2]}).encode(), "non-empty string"),
                             (json.dumps({"a": None}).encode(), "at least one"),
                             (json.dumps({"a": ["query", None]}).encode(), "non-empty string"),
                             (json.dumps(["query"]).encode(), "object"),
                             (json.dumps({"a": ["re:)"]}).encode(), "regular expression")]:
        groups.write_bytes(content)
        code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "g", "--groups", groups)
        assert_refused(code, err, message)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ paths
def test_output_paths(capsys, tiny_train_args, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for out, message in [(a_file, "not a folder"), ("/dev/null", "not a folder"), (a_file / "sub", "not a folder")]:
        args = [a if a != str(tmp_path / "runs") else str(out) for a in tiny_train_args]
        assert_refused(*cli(capsys, "train", *args, "--name", "x")[::2], message)
    assert a_file.read_text() == "mine"

    assert cli(capsys, "train", *tiny_train_args, "--name", "ok", "--max-steps", "1")[0] == 0
    run = tmp_path / "runs" / "ok"
    for dest, message in [(tmp_path, "is a folder"), (str(tmp_path) + "/new/", "is a folder"),
                          (a_file / "p.csv", "not a folder"), ("/dev/null", "not a regular file")]:
        code, _, err = cli(capsys, "eval", "--run", run, "--predictions", dest)
        assert_refused(code, err, message)
    assert a_file.read_text() == "mine"


def test_overwrite_never_deletes_what_supernet_did_not_write(capsys, tiny_train_args, tiny_bert_dir, tmp_path):
    # a user's model folder (it has a config.json) used as the run name, then as the model itself
    model = tmp_path / "runs" / "mymodel"
    shutil.copytree(tiny_bert_dir, model)
    files = sorted(p.name for p in model.iterdir())
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "mymodel", "--overwrite")
    assert_refused(code, err, "not a supernet run")
    args = [str(model) if a == str(tiny_bert_dir) else a for a in tiny_train_args]
    code, _, err = cli(capsys, "train", *args, "--name", "mymodel", "--overwrite")
    assert_refused(code, err, "not a supernet run")
    assert sorted(p.name for p in model.iterdir()) == files
    # a real run holding a file the user added is not replaced either
    assert cli(capsys, "train", *tiny_train_args, "--name", "r", "--max-steps", "1")[0] == 0
    (tmp_path / "runs" / "r" / "notes.txt").write_text("mine")
    assert_refused(*cli(capsys, "train", *tiny_train_args, "--name", "r", "--overwrite")[::2], "did not write")
    assert (tmp_path / "runs" / "r" / "notes.txt").read_text() == "mine"
    (tmp_path / "runs" / "r" / "notes.txt").unlink()
    assert cli(capsys, "train", *tiny_train_args, "--name", "r", "--overwrite", "--max-steps", "2")[0] == 0
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------ model files
def test_model_files(capsys, tiny_train_args, tiny_bert_dir, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_bert_dir, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    binary_config = tmp_path / "binconf"
    shutil.copytree(tiny_bert_dir, binary_config)
    (binary_config / "config.json").write_bytes(b"\x00\xff" * 10)
    for model, message in [(truncated, "cannot load model"), (pickled, "safetensors only"),
                           (binary_config, "cannot load model")]:
        args = [str(model) if a == str(tiny_bert_dir) else a for a in tiny_train_args]
        assert_refused(*cli(capsys, "train", *args, "--name", "m")[::2], message)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ datasets
def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _rows(label_of, n=80):
    return [{"text": ("good great fine" if i % 2 else "bad awful dull") + f" {i}", "label": label_of(i)}
            for i in range(n)]


def test_string_labels_named_label_train_and_eval(capsys, tiny_train_args, tiny_bert_dir, tmp_path):
    """The most common dataset shape: columns text,label with string labels."""
    data = _write(tmp_path / "d.csv", _rows(lambda i: "pos" if i % 2 else "neg"))
    args = ["--model", tiny_bert_dir, "--dataset", data, "--ranks", "4,2", "--max-steps", "2", "--batch-size", "8",
            "--max-length", "16", "--eval-samples", "8", "--out", tmp_path / "runs", "--name", "s"]
    code, _, err = cli(capsys, "train", *args)
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "s" / "config.json").read_text())
    assert record["label_names"] == ["neg", "pos"]
    code, out, err = cli(capsys, "eval", "--run", tmp_path / "runs" / "s", "--split", "test")
    assert code == 0, err and json.loads(out)["examples"] == 16


@pytest.mark.parametrize(("suffix", "labels", "outcome"), [
    (".csv", lambda i: 1.0 if i % 2 else 0.0, ["0", "1"]),  # integral floats are integer ids
    (".jsonl", lambda i: 1 if i % 2 else "pos", ["1", "pos"]),  # mixed types: names by their text
    (".csv", lambda i: None if i == 7 else i % 2, "has no label"),
    (".csv", lambda i: "" if i == 7 else "ab"[i % 2], "has no label"),
    (".jsonl", lambda i: 0.5 * (i % 3), "holds the number 0.5"),
    (".jsonl", lambda i: [i % 2], "holds list values"),
    (".jsonl", lambda i: {"y": i % 2}, "holds dict values"),
])
def test_label_values(tmp_path, suffix, labels, outcome):
    from supernet.data import load_task_data

    path = _write(tmp_path / f"d{suffix}", _rows(labels))
    if isinstance(outcome, list):
        d = load_task_data(str(path))
        assert d.label_names == outcome
        for split in d.splits.values():
            assert split.features["label"].dtype == "int64"
            for t, y in zip(split["text"], split["label"], strict=True):
                assert str(labels(int(t.split()[-1]))).replace(".0", "") == d.label_names[y]
    else:
        with pytest.raises(SupernetError, match=outcome):
            load_task_data(str(path))


def test_text_values(tmp_path):
    from supernet.data import load_task_data

    numbers = _write(tmp_path / "n.jsonl", [{"text": i, "label": i % 2} for i in range(40)])
    assert sorted(int(t) for s in load_task_data(str(numbers)).splits.values() for t in s["text"]) == list(range(40))
    lists = _write(tmp_path / "l.jsonl", [{"text": ["a", str(i)], "label": i % 2} for i in range(40)])
    with pytest.raises(SupernetError, match="holds list values"):
        load_task_data(str(lists))
    missing = _write(tmp_path / "m.jsonl", [{"text": None if i == 3 else "x", "label": i % 2} for i in range(40)])
    with pytest.raises(SupernetError, match="no text"):
        load_task_data(str(missing))


# ------------------------------------------------------------------------------------ damaged runs
def test_runs_edited_after_training(capsys, tiny_train_args, tiny_csv, tmp_path):
    assert cli(capsys, "train", *tiny_train_args, "--name", "e", "--max-steps", "4")[0] == 0
    run = tmp_path / "runs" / "e"
    config = run / "config.json"
    original = config.read_text()
    record = json.loads(original)
    record["train"]["max_length"] = 100000
    config.write_text(json.dumps(record))
    assert_refused(*cli(capsys, "eval", "--run", run)[::2], "exceeds the 128 positions")
    config.write_text(original)

    # a garbage row in the training log does not stop --resume; the log is clean afterwards
    with open(run / "train_log.csv", "a") as f:
        f.write("garbage,\x00,row\n")
    code, _, err = cli(capsys, "train", "--resume", run, "--max-steps", "6")
    assert code == 0, err
    assert list(pd.read_csv(run / "train_log.csv")["step"]) == list(range(1, 7))

    # the dataset's label names changed since: refuse rather than score against the wrong names
    record = json.loads(config.read_text())
    df = pd.read_csv(tiny_csv)
    df["sentiment"] = df["sentiment"].map({"yes": "positive", "no": "negative"})
    moved = tmp_path / "relabelled.csv"
    df.to_csv(moved, index=False)
    record["train"]["dataset"] = str(moved)
    config.write_text(json.dumps(record))
    assert_refused(*cli(capsys, "eval", "--run", run)[::2], "trained with labels")
    assert_refused(*cli(capsys, "train", "--resume", run, "--max-steps", "8")[::2], "trained with labels")


def test_run_is_portable_and_summary_is_strict_json(capsys, tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    """Relative dataset/model paths are stored absolute: eval works from another directory."""
    shutil.copy(tiny_csv, tmp_path / "data.csv")
    monkeypatch.chdir(tmp_path)
    args = ["--model", os.path.relpath(tiny_bert_dir, tmp_path), "--dataset", "data.csv", "--text-column", "sentence",
            "--label-column", "sentiment", "--ranks", "4,2", "--max-steps", "2", "--batch-size", "8",
            "--max-length", "16", "--eval-samples", "8", "--out", "runs", "--name", "p", "--lr", "1e30"]
    assert cli(capsys, "train", *args)[0] == 0
    record = json.loads((tmp_path / "runs" / "p" / "config.json").read_text())
    assert record["train"]["dataset"] == str(tmp_path / "data.csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli(capsys, "eval", "--run", tmp_path / "runs" / "p", "--split", "validation")
    assert code == 0, err

    def no_constants(name):
        raise ValueError(name)

    json.loads((tmp_path / "runs" / "p" / "summary.json").read_text(), parse_constant=no_constants)
    runfiles.write_json(tmp_path / "nan.json", {"loss": float("nan"), "x": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "nan.json").read_text(), parse_constant=no_constants) == {"loss": None,
                                                                                           "x": [None, 1.0]}


def test_resume_uses_the_groups_as_trained(capsys, tiny_train_args, tmp_path):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"attn": ["query", "key", "value"], "rest": ["dense"]}))
    assert cli(capsys, "train", *tiny_train_args, "--name", "g", "--groups", groups, "--max-steps", "3")[0] == 0
    groups.write_text(json.dumps({"everything": ["query", "key", "value", "dense"]}))  # edited afterwards
    code, _, err = cli(capsys, "train", "--resume", tmp_path / "runs" / "g", "--max-steps", "6")
    assert code == 0, err
    record = json.loads((tmp_path / "runs" / "g" / "config.json").read_text())
    assert set(record["groups"]) == {"attn", "rest"}


# ------------------------------------------------------------------------------------ crash windows
class Crash(RuntimeError):
    pass


def _same_weights(a_dir, b_dir):
    a = runfiles.load_tensors(a_dir / runfiles.ADAPTER)
    b = runfiles.load_tensors(b_dir / runfiles.ADAPTER)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def reference_run(tiny_bert_dir, tiny_csv, tmp_path):
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="reference")
    train(cfg)
    return cfg.run_dir()


def test_stop_before_the_first_checkpoint_resumes(tiny_bert_dir, tiny_csv, tmp_path, reference_run):
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="early")

    def crash(step, trainer):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    assert not (cfg.run_dir() / "checkpoint").exists()
    resume(cfg.run_dir())
    _same_weights(reference_run, cfg.run_dir())
    assert list(pd.read_csv(cfg.run_dir() / "train_log.csv")["step"]) == list(range(1, 9))


def test_kill_inside_the_checkpoint_swap_resumes(tiny_bert_dir, tiny_csv, tmp_path, reference_run, monkeypatch):
    """Killed between moving the old checkpoint aside and renaming the new one in."""
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="swap")
    real = files.os.replace  # the one folder swap (supernet.files.swap_dir)
    calls = []

    def replace(src, dst):
        calls.append(str(src))
        if str(src).endswith("checkpoint.tmp") and (runfiles.Path(dst).parent / "checkpoint.old").exists():
            raise Crash  # the second checkpoint (step 8): old one moved aside, new one not yet in
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(files.os, "replace", real)
    run = cfg.run_dir()
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").is_dir()
    steps_run = []
    resume(run, on_step=lambda step, trainer: steps_run.append(step))
    assert steps_run == []  # the complete step-8 checkpoint was found: nothing trained again
    _same_weights(reference_run, run)
    assert not (run / "checkpoint.old").exists() and not (run / "checkpoint.tmp").exists()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 8  # the newest copy kept


def test_kill_after_the_last_checkpoint_finishes_on_resume(tiny_bert_dir, tiny_csv, tmp_path, reference_run):
    run = tmp_path / "late"
    shutil.copytree(reference_run, run)
    (run / runfiles.ADAPTER).unlink()  # killed after the last checkpoint, before the final weights
    (run / runfiles.SUMMARY).unlink()
    summary = resume(run)
    assert summary["steps"] == 8 and len(summary["validation"]) == 3
    _same_weights(reference_run, run)
    with pytest.raises(SupernetError, match="already finished"):
        resume(run)


def test_failed_resume_keeps_the_finished_weights(capsys, tiny_bert_dir, tiny_csv, tmp_path, reference_run):
    before = (reference_run / runfiles.ADAPTER).read_bytes()
    config = reference_run / "config.json"
    record = json.loads(config.read_text())
    record["train"]["dataset"] = str(tmp_path / "gone.csv")
    config.write_text(json.dumps(record))
    code, _, err = cli(capsys, "train", "--resume", reference_run, "--max-steps", "12")
    assert code == 2 and "unknown dataset" in err
    assert (reference_run / runfiles.ADAPTER).read_bytes() == before


def test_file_system_refusals_end_as_one_line(capsys, tiny_train_args, tmp_path, monkeypatch):
    """A read-only or full disk (root passes os.access checks, so simulate the refusal) ends as one
    line, exit 2, and leaves no run behind."""
    def refuse(run_dir):
        raise PermissionError(13, "Permission denied", str(run_dir))

    monkeypatch.setattr(runfiles, "mark_run", refuse)
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "ro")
    assert_refused(code, err, "Permission denied")
    assert not (tmp_path / "runs" / "ro").exists()


# ------------------------------------------------------------------------------------ answers and options files
def test_answers_the_tokenizer_cannot_tell_apart(capsys, tiny_llama_dir, tmp_path):
    """Two labels whose answer words tokenize to the same ids would train on loss ln 2 with every
    prediction a tie: refused, naming both; so are two such choices of one multiple-choice example."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("☃", "☄")]
    assert ids[0] == ids[1]  # both unknown to MiniLM's vocabulary: [UNK]
    args = ["--model", tiny_llama_dir, "--ranks", "4,2", "--max-steps", "2", "--batch-size", "8",
            "--max-length", "16", "--eval-samples", "8", "--out", tmp_path / "runs"]
    data = _write(tmp_path / "snow.csv", _rows(lambda i: "☃" if i % 2 else "☄"))
    code, _, err = cli(capsys, "train", *args, "--dataset", data, "--name", "snow")
    assert_refused(code, err, "both tokenize to")
    assert "☃" in err and "☄" in err and str(ids[0]) in err

    rows = [{"q": f"question {i}", "opts": ["sun", "moon", "star"], "gold": i % 3} for i in range(40)]
    rows[5]["opts"] = ["sun", "☃", "☄"]
    mc = _write(tmp_path / "mc.jsonl", rows)
    code, _, err = cli(capsys, "train", *args, "--dataset", mc, "--text-column", "q", "--label-column", "gold",
                       "--choices-column", "opts", "--name", "mc")
    assert_refused(code, err, "both tokenize to")
    assert "☃" in err and "☄" in err and "example" in err
    assert not (tmp_path / "runs").exists()


def test_yaml_misreadings_of_string_options(capsys, tiny_train_args, tmp_path):
    """YAML 1.1 reads ``2:4`` as the base-60 number 124 and ``yes`` as a boolean: an option that must
    be a string is refused with what YAML read and how to quote it; quoted, it is accepted."""
    cfg = tmp_path / "run.yaml"
    for text, shown in [("pattern: 2:4\nsparsity: 0.5\n", 'YAML read 2:4 as the number 124; quote it: pattern: "2:4"'),
                        ("name: yes\n", 'YAML read yes as the boolean True; quote it: name: "yes"'),
                        ("prune: 0x1F\n", 'quote it: prune: "0x1F"'),
                        ("target-modules: [query, on]\n", 'YAML read on as the boolean True; quote it: "on"')]:
        cfg.write_text(text)
        code, _, err = cli(capsys, "train", "--config", cfg, *tiny_train_args, "--name", "y")
        assert_refused(code, err, shown)
        assert "run.yaml" in err
    assert not (tmp_path / "runs").exists()
    for name, text in [("quoted.yaml", 'pattern: "2:4"\nsparsity: 0.5\ncalibration-samples: 16\n'),
                       ("plain.json", json.dumps({"pattern": "2:4", "sparsity": 0.5, "calibration_samples": 16}))]:
        cfg = tmp_path / name
        cfg.write_text(text)
        code, _, err = cli(capsys, "train", "--config", cfg, *tiny_train_args, "--name", cfg.stem, "--max-steps", "1")
        assert code == 0, err
        assert json.loads((tmp_path / "runs" / cfg.stem / "config.json").read_text())["train"]["pattern"] == "2:4"
