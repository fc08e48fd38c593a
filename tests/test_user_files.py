"""Nothing a user owns is overwritten, and every file read back is checked (issue 12).

Each test plays one hostile input against the commands that write (eval, export, plot, search)
or read back what they wrote, and checks the rule: a clear one-line refusal, nothing that
supernet did not write changed, and no half-written output left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli

from supernet import plots
from supernet.cli import main
from supernet.commands.plot import plot_run
from supernet.errors import SupernetError
from supernet.search import SearchSettings, hypervolume, pareto_front, run_search
from supernet.space import SearchSpace


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(out: Path, model: Path, data: Path, name: str = "run", *extra) -> Path:
    code = main(["train", "--model", str(model), "--dataset", str(data), "--text-column", "sentence",
                 "--label-column", "sentiment", "--ranks", "8,4", "--max-steps", "6", "--batch-size", "8",
                 "--eval-every", "6", "--save-every", "6", "--eval-samples", "16", "--max-length", "16",
                 "--lr", "1e-2", "--out", str(out), "--name", name, *map(str, extra)])
    assert code == 0
    return out / name


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory, tiny_bert_dir) -> Path:
    """A private copy of the tiny BERT, so that a test may try to destroy its files."""
    d = tmp_path_factory.mktemp("model") / "bert"
    shutil.copytree(tiny_bert_dir, d)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_copy, tiny_csv) -> Path:
    """A short run with one finished search ("a")."""
    run = train(tmp_path_factory.mktemp("runs"), model_copy, tiny_csv)
    assert main(["search", "--run", str(run), "--algorithm", "random", "--population", "2", "--evaluations", "4",
                 "--eval-samples", "16", "--name", "a"]) == 0
    return run


# ----------------------------------------------------------------------------- data loss
def test_export_overwrite_refuses_a_folder_holding_user_files(capsys, run, tmp_path):
    out = tmp_path / "export"
    assert cli(capsys, "export", "--run", run, "--subnet", "min", "--out", out)[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "data.bin").write_bytes(b"\x00\x01")
    before = {p: digest(p) for p in out.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "max", "--out", out, "--overwrite")
    assert_refused(code, err, "which supernet did not write")
    assert "'extra/data.bin'" in err and "'notes.txt'" in err
    assert {p: digest(p) for p in out.rglob("*") if p.is_file()} == before
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # our file, edited by the user
    shutil.rmtree(out / "extra")
    (out / "notes.txt").unlink()
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "max", "--out", out, "--overwrite")
    assert_refused(code, err, "'config.json'")
    (out / "config.json").write_text((out / "config.json").read_text()[:-1])  # restored: ours again
    assert cli(capsys, "export", "--run", run, "--subnet", "max", "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["metadata"]["source"] == "max"


def test_pareto_export_overwrite_checks_every_member(capsys, run, tmp_path):
    out = tmp_path / "front"
    assert cli(capsys, "export", "--run", run, "--pareto", "--search", "a", "--out", out, "--format", "peft")[0] == 0
    member = next(p for p in out.iterdir() if p.is_dir())
    (member / "my_notes.md").write_text("mine")
    code, _, err = cli(capsys, "export", "--run", run, "--pareto", "--search", "a", "--out", out, "--format", "peft",
                       "--overwrite")
    assert_refused(code, err, f"'{member.name}/my_notes.md'")
    assert (member / "my_notes.md").read_text() == "mine"
    (member / "my_notes.md").unlink()
    assert cli(capsys, "export", "--run", run, "--pareto", "--search", "a", "--out", out, "--format", "peft",
               "--overwrite")[0] == 0


def test_export_never_writes_over_what_the_run_reads(capsys, tmp_path, tiny_bert_dir, tiny_csv):
    """A run trained on an earlier export: exporting over that export would replace its own base model."""
    first = train(tmp_path / "runs", tiny_bert_dir, tiny_csv, "first")
    base = tmp_path / "base"
    assert cli(capsys, "export", "--run", first, "--subnet", "max", "--out", base)[0] == 0
    second = train(tmp_path / "runs", base, tiny_csv, "second")
    capsys.readouterr()
    before = {p: digest(p) for p in base.iterdir()}
    for out in (base, base / "inner", tmp_path / "runs" / "second", tmp_path / "runs"):
        code, _, err = cli(capsys, "export", "--run", second, "--subnet", "min", "--out", out, "--overwrite")
        assert_refused(code, err, "which run")
    assert {p: digest(p) for p in base.iterdir()} == before


def test_predictions_never_overwrite_a_file_supernet_did_not_write(capsys, run, model_copy, tiny_csv, tmp_path):
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    victims = [run / "config.json", run / "train_log.csv", run / "adapter.safetensors",
               model_copy / "model.safetensors", model_copy / "config.json", tiny_csv, mine]
    before = {p: digest(p) for p in victims}
    for victim in victims:
        code, _, err = cli(capsys, "eval", "--run", run, "--limit", "4", "--predictions", victim)
        assert code == 2 and err.count("\n") == 1 and "--predictions" in err, err
    assert {p: digest(p) for p in victims} == before
    preds = tmp_path / "preds.csv"
    for _ in range(2):  # a previous predictions file may be replaced
        code, _, err = cli(capsys, "eval", "--run", run, "--limit", "4", "--predictions", preds)
        assert code == 0, err
    assert list(pd.read_csv(preds).columns)[:3] == ["index", "label", "prediction"]


def test_plot_never_overwrites_a_users_files(capsys, run, tmp_path):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "training.png").write_bytes(b"my own figure")
    (out / "hypervolume.csv").write_text("my,own\n1,2\n")
    code, _, err = cli(capsys, "plot", "--run", run, "--out", out)
    assert_refused(code, err, "'hypervolume.csv'")
    assert "'training.png'" in err
    assert sorted(p.name for p in out.iterdir()) == ["hypervolume.csv", "training.png"]
    assert (out / "training.png").read_bytes() == b"my own figure"
    other = tmp_path / "other"
    for _ in range(2):  # its own earlier figures are replaced
        assert cli(capsys, "plot", "--run", run, "--out", other)[0] == 0
    (other / "training.csv").write_text("edited by hand\n")
    code, _, err = cli(capsys, "plot", "--run", run, "--out", other)
    assert_refused(code, err, "'training.csv'")


# ----------------------------------------------------------------------------- tracebacks
def test_latency_probe_fits_a_small_vocabulary():
    from transformers import BertConfig, BertForSequenceClassification

    from supernet.evaluator import Evaluator
    from supernet.network import SuperNetConfig, SuperNetwork

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    net = SuperNetwork(model, SuperNetConfig(target_modules=["query", "value"], ranks=[4, 2]))
    evaluator = Evaluator.__new__(Evaluator)  # only the latency probe: no data needed
    evaluator.net, evaluator.device, evaluator.seq_len, evaluator.latency_batch = net, torch.device("cpu"), 8, 2
    assert evaluator.latency(net.space.max_config(), repeats=1) > 0


class Failing:
    def __call__(self, config):
        raise IndexError("the evaluator broke")


def test_a_new_search_that_fails_before_its_first_evaluation_leaves_nothing(tmp_path):
    space = SearchSpace({"a": [8, 4], "b": [8, 4]})
    with pytest.raises(IndexError):
        run_search(space, Failing(), None, tmp_path / "s", SearchSettings(population=2, evaluations=4))
    assert not (tmp_path / "s").exists()
    (tmp_path / "empty").mkdir()  # a folder the user made stays
    with pytest.raises(IndexError):
        run_search(space, Failing(), None, tmp_path / "empty", SearchSettings(population=2, evaluations=4))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1.5"])
def test_search_seed_follows_the_train_rule(capsys, run, seed):
    code, _, err = cli(capsys, "search", "--run", run, "--algorithm", "random", "--seed", seed, "--name", "bad-seed")
    assert code == 2 and err.count("\n") == 1, err
    assert not (run / "search" / "bad-seed").exists()
    code, _, err = cli(capsys, "train", "--model", "x", "--seed", seed)
    assert code == 2 and err.count("\n") == 1, err


def test_deeply_nested_subnet_file_is_refused(capsys, run, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    for argv in (["eval", "--run", run, "--subnet", deep], ["export", "--run", run, "--subnet", deep]):
        code, _, err = cli(capsys, *argv)
        assert_refused(code, err, "nests its values too deeply")


# ----------------------------------------------------------------------------- history.csv read back
def synthetic(config):
    return {"accuracy": 0.5 + 0.001 * sum(config.values()), "loss": 1.0}


def cost(config):
    return {"macs": float(sum(config.values())), "params": float(sum(config.values()))}


SPACE = SearchSpace({f"g{i}": [8, 6, 4] for i in range(4)})


def small_search(out: Path, resume: bool = False, evaluations: int = 8):
    return run_search(SPACE, synthetic, cost, out, SearchSettings(algorithm="random", population=4,
                                                                   evaluations=evaluations), resume=resume)


def test_resume_refuses_binary_garbage_in_history(tmp_path):
    small_search(tmp_path / "s")
    with (tmp_path / "s" / "history.csv").open("ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    with pytest.raises(SupernetError, match=r"line 10 is not text"):
        small_search(tmp_path / "s", resume=True)


def test_a_non_finite_row_is_refused_with_its_line_and_never_on_the_front(tmp_path):
    small_search(tmp_path / "s")
    path = tmp_path / "s" / "history.csv"
    frame = pd.read_csv(path)
    frame.loc[3, "accuracy"] = math.nan
    frame.loc[3, "obj_acc"] = math.nan
    frame.to_csv(path, index=False, na_rep="nan")
    with pytest.raises(SupernetError, match=r"line 5: objective 'acc' is nan"):
        small_search(tmp_path / "s", resume=True)
    front = pareto_front(frame, ["obj_acc", "obj_macs"])
    assert 3 not in set(front["index"]) and len(front) > 0


def test_pick_best_never_chooses_a_member_without_accuracy():
    from supernet.commands.export import pick_best

    front = pd.DataFrame({"index": [0, 1], "val_accuracy": [math.nan, 0.6], "macs": [1.0, 2.0]})
    assert int(pick_best(front, None)["index"]) == 1
    with pytest.raises(SupernetError, match="no front member"):
        pick_best(front.iloc[:1], None)


def test_duplicated_history_rows_count_once(tmp_path, capsys):
    first = small_search(tmp_path / "s")
    path = tmp_path / "s" / "history.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines + lines[3:6]))  # three rows recorded twice
    run_dir = tmp_path / "run"
    (run_dir / "search").mkdir(parents=True)
    shutil.copytree(tmp_path / "s", run_dir / "search" / "s")
    assert len(plots.load_search(run_dir, "s").history) == len(first.history)
    again = small_search(tmp_path / "s", resume=True)
    assert len(again.history) == len(first.history) and "recorded 3 configuration(s) twice" in capsys.readouterr().err
    assert pd.read_csv(path)["config"].is_unique


HOLD = """
import sys, time
from pathlib import Path
from supernet.files import exclusive
with exclusive(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_two_writers_of_one_search_are_refused(tmp_path):
    small_search(tmp_path / "s")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "s" / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (tmp_path / "s" / "history.csv").read_text()
        with pytest.raises(SupernetError, match="already running in another process"):
            small_search(tmp_path / "s", resume=True)
        assert (tmp_path / "s" / "history.csv").read_text() == before
    finally:
        holder.kill()
        holder.wait()
    assert len(small_search(tmp_path / "s", resume=True).history) == 8  # released when its holder died


# ----------------------------------------------------------------------------- partial output
def test_an_infeasible_constraint_writes_nothing_and_blocks_no_name(capsys, run):
    code, _, err = cli(capsys, "search", "--run", run, "--algorithm", "random", "--constraint", "macs<=1",
                       "--name", "tight")
    assert_refused(code, err, "no configuration satisfies the constraint macs<=1")
    assert not (run / "search" / "tight").exists()
    assert cli(capsys, "search", "--run", run, "--algorithm", "random", "--population", "2", "--evaluations", "2",
               "--eval-samples", "16", "--name", "tight")[0] == 0
    shutil.rmtree(run / "search" / "tight")


def test_export_ignores_a_search_that_never_finished(capsys, run):
    stale = run / "search" / "stale"
    stale.mkdir()
    shutil.copy(run / "search" / "a" / "search.json", stale / "search.json")
    header = (run / "search" / "a" / "pareto.csv").read_text().splitlines()[0]
    (stale / "pareto.csv").write_text(header + "\n")
    try:
        for argv in (["--subnet", "best"], ["--pareto"]):  # the one finished search is taken
            code, out, err = cli(capsys, "export", "--run", run, *argv, "--format", "peft", "--out",
                                 run / "exports" / f"x{len(argv)}")
            assert code == 0, err
        code, _, err = cli(capsys, "export", "--run", run, "--subnet", "best", "--search", "stale")
        assert_refused(code, err, "never finished")
    finally:
        shutil.rmtree(stale)


# ----------------------------------------------------------------------------- messages
def test_messages_say_what_the_path_is(capsys, run, tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    code, _, err = cli(capsys, "eval", "--run", a_file)
    assert_refused(code, err, "is a file, not a run folder")
    code, _, err = cli(capsys, "eval", "--run", run, "--subnet", "/dev/zero")
    assert_refused(code, err, "is not a regular file")
    code, _, err = cli(capsys, "eval", "--run", run, "--subnet", tmp_path)
    assert_refused(code, err, "is a folder, not a file")


def test_plot_of_one_search_survives_another_corrupt_one(capsys, run, tmp_path):
    broken = run / "search" / "broken"
    shutil.copytree(run / "search" / "a", broken)
    (broken / "history.csv").write_bytes(b"\x00\x01 not a csv")
    try:
        code, out, err = cli(capsys, "plot", "--run", run, "--search", "a", "--out", tmp_path / "p")
        assert code == 0, err
        assert "skipping search 'broken'" in err
        code, _, err = cli(capsys, "plot", "--run", run, "--out", tmp_path / "q")  # every search: corrupt is an error
        assert_refused(code, err, "broken")
    finally:
        shutil.rmtree(broken)


def test_hypervolume_reference_is_readable_when_every_accuracy_is_equal():
    from supernet.search import OBJECTIVES

    history = pd.DataFrame({"index": [0, 1, 2], "generation": 0, "config": ['{"a":1}', '{"a":2}', '{"a":3}'],
                            "accuracy": 0.55, "macs": [1e6, 2e6, 3e6], "obj_acc": -0.55,
                            "obj_macs": [1e6, 2e6, 3e6]})
    search = plots.Search("s", "nsga2", (OBJECTIVES["acc"], OBJECTIVES["macs"]), history,
                          [json.loads(c) for c in history["config"]], {0}, None)
    frame = plots.hypervolume_frame([search])
    text = plots.reference_text(frame.iloc[0])
    accuracy = float(text.split("accuracy ")[1].split("%")[0])
    assert 50 < accuracy < 55 and "every point equal" in text
    assert np.isclose(frame["hypervolume"].iloc[-1], hypervolume(
        history[["obj_acc", "obj_macs"]].to_numpy(), frame[["ideal_1", "ideal_2"]].iloc[0].to_numpy(),
        frame[["nadir_1", "nadir_2"]].iloc[0].to_numpy()))


def test_merged_export_names_the_classes(capsys, run, tmp_path):
    assert cli(capsys, "export", "--run", run, "--subnet", "max", "--out", tmp_path / "m")[0] == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    labels = json.loads((run / "config.json").read_text())["label_names"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(labels)} and labels == ["no", "yes"]
    assert config["label2id"] == {n: i for i, n in enumerate(labels)}
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["metadata"]["labels"] == labels


# ----------------------------------------------------------------------------- found in review
def test_a_user_folder_with_an_index_csv_is_not_taken_for_an_export(capsys, run, tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "index.csv").write_text("my,own\n1,2\n")
    (mine / "README.md").write_text("notes")
    for argv in (["--subnet", "min"], ["--pareto", "--search", "a"]):
        code, _, err = cli(capsys, "export", "--run", run, *argv, "--out", mine, "--overwrite")
        assert_refused(code, err, "is not a supernet export")
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "index.csv"]


def test_a_file_that_appears_while_the_export_runs_is_kept(capsys, run, tmp_path, monkeypatch):
    import supernet.export as export_module

    out = tmp_path / "export"
    assert cli(capsys, "export", "--run", run, "--subnet", "min", "--out", out)[0] == 0
    verify = export_module.verify_merged

    def verify_and_meddle(*args, **kwargs):
        (out / "notes.txt").write_text("written meanwhile")
        return verify(*args, **kwargs)

    monkeypatch.setattr(export_module, "verify_merged", verify_and_meddle)
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "max", "--out", out, "--overwrite")
    assert_refused(code, err, "'notes.txt'")
    assert (out / "notes.txt").read_text() == "written meanwhile" and (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or set-aside folder left


def test_a_users_tmp_file_beside_our_output_is_untouched(capsys, run, tmp_path):
    (tmp_path / "preds.csv.tmp").write_text("mine")
    assert cli(capsys, "eval", "--run", run, "--limit", "4", "--predictions", tmp_path / "preds.csv")[0] == 0
    assert (tmp_path / "preds.csv.tmp").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv", "preds.csv.tmp"]


def test_train_overwrite_keeps_user_files_among_exports_and_plots(capsys, tmp_path, tiny_bert_dir, tiny_csv):
    run = train(tmp_path / "runs", tiny_bert_dir, tiny_csv, "r")
    assert cli(capsys, "export", "--run", run, "--subnet", "min", "--format", "peft")[0] == 0
    assert cli(capsys, "plot", "--run", run)[0] == 0
    args = ["train", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence", "--label-column",
            "sentiment", "--ranks", "8,4", "--max-steps", "2", "--out", tmp_path / "runs", "--name", "r",
            "--overwrite"]
    for planted in (run / "exports" / "min-peft" / "notes.txt", run / "exports" / "analysis.ipynb",
                    run / "plots" / "my-figure.png"):
        planted.write_text("mine")
        code, _, err = cli(capsys, *args)
        assert_refused(code, err, "which supernet did not write")
        assert planted.read_text() == "mine"
        planted.unlink()
    (run / "plots" / "training.csv").write_text("edited\n")  # our plot, edited by the user
    assert_refused(*cli(capsys, *args)[::2], "plots/training.csv")
    (run / "plots" / "training.csv").unlink()
    assert cli(capsys, *args)[0] == 0  # only supernet's own files left: replaced


def test_a_plot_killed_mid_write_does_not_lock_out_the_next(capsys, run, tmp_path, monkeypatch):
    from supernet import files

    out = tmp_path / "p"
    assert cli(capsys, "plot", "--run", run, "--out", out)[0] == 0
    monkeypatch.setattr(plots, "DPI", 60)  # the next figures differ from the recorded ones
    calls = {"n": 0}
    ledger = files._write_ledger

    def killed_after_a_rename(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the first figure's pending entry written and the figure renamed in: then the kill
            raise KeyboardInterrupt
        return ledger(*args)

    monkeypatch.setattr(files, "_write_ledger", killed_after_a_rename)
    with pytest.raises(KeyboardInterrupt):
        plot_run(run, out=out)
    monkeypatch.setattr(files, "_write_ledger", ledger)
    entry = files.read_ledger(out)["search_progress_a.png"]
    assert isinstance(entry, list) and files.fingerprint(out / "search_progress_a.png") == entry[-1] != entry[0]
    code, _, err = cli(capsys, "plot", "--run", run, "--out", out)
    assert code == 0, err


def test_a_second_resume_of_a_running_search_is_refused_before_the_model_loads(capsys, run):
    lock = run / "search" / "a" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: digest(p) for p in (run / "search" / "a").rglob("*") if p.is_file()}
        code, _, err = cli(capsys, "search", "--run", run, "--resume", "--name", "a")
        assert_refused(code, err, "already running in another process")
        assert {p: digest(p) for p in (run / "search" / "a").rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()


def test_a_band_constraint_that_some_configuration_meets_is_accepted(tmp_path):
    result = run_search(SPACE, synthetic, cost, tmp_path / "small", SearchSettings(
        algorithm="random", population=4, evaluations=4, constraint="macs>16,macs<=18"))
    assert len(result.history) > 0 and result.history["macs"].between(16, 18, inclusive="right").all()
    big = SearchSpace({f"g{i}": [8, 6, 4] for i in range(12)})  # 3^12: not enumerated
    result = run_search(big, synthetic, cost, tmp_path / "big", SearchSettings(
        algorithm="nsga2", population=4, evaluations=4, constraint="macs>48,macs<=50"))
    assert (tmp_path / "big" / "search.json").is_file()  # not refused up front: the search ran
