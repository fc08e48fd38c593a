"""`supernet plot` on hand-made run folders: searches from `run_search` with a synthetic evaluator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supernet import plots
from supernet.cli import build_parser
from supernet.commands import plot as plot_command
from supernet.commands.plot import plot_run
from supernet.errors import SupernetError
from supernet.files import LEDGER
from supernet.search import SearchSettings, hypervolume, run_search
from supernet.space import SearchSpace

CHOICES = (32, 24, 16)
GROUPS = [f"L{i}.qkv" for i in range(4)]
WEIGHTS = np.array([4.0, 3.0, 2.0, 1.0])
COSTS = np.array([1.0, 3.0, 2.0, 4.0])


class Synthetic:
    """Accuracy concave in the ranks, MACs and params linear: a known trade-off."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def ranks(self, config: dict) -> np.ndarray:
        return np.array([config[g] for g in self.space.groups], dtype=float)

    def cost(self, config: dict) -> dict:
        r = self.ranks(config)
        return {"macs": float(7e8 + 1e5 * (COSTS * r).sum()), "params": float(1000 * r.sum())}

    def __call__(self, config: dict) -> dict:
        r = self.ranks(config) / max(CHOICES)
        accuracy = 0.6 + 0.3 * float((WEIGHTS * np.sqrt(r)).sum() / WEIGHTS.sum())
        return {"accuracy": accuracy, "loss": 1.0 - accuracy}


def make_run(root: Path, searches: dict[str, dict]) -> Path:
    """A run folder with config.json, train_log.csv, eval_log.csv and the given searches."""
    run = root / "run"
    run.mkdir(parents=True)
    space = SearchSpace({g: list(CHOICES) for g in GROUPS})
    evaluator = Synthetic(space)
    named = {k: space.named_config(k) for k in ("max", "mid", "min")}
    record = {"train": {"max_length": 64, "max_steps": 60}, "supernet": {"ranks": list(CHOICES)},
              "choices": space.choices, "groups": {g: [g] for g in GROUPS},
              "macs": {k: evaluator.cost(c)["macs"] for k, c in named.items()},
              "trainable_params": {k: evaluator.cost(c)["params"] for k, c in named.items()}}
    (run / "config.json").write_text(json.dumps(record))
    (run / ".supernet-run").write_text("")
    rng = np.random.default_rng(0)
    steps = np.arange(1, 61)
    pd.DataFrame({"step": steps, "epoch": steps // 30, "loss": 0.7 * np.exp(-steps / 30) + 0.05 * rng.random(60),
                  "lr": 1e-3, "grad_norm": 1.0, "seconds": steps * 0.1,
                  "config": [json.dumps(space.sample(rng)) for _ in steps]}).to_csv(run / "train_log.csv", index=False)
    evals = [{"step": s, "subnet": n, "accuracy": round(0.6 + s / 300 - 0.02 * k, 4), "loss": 0.5, "examples": 64}
             for s in (20, 40, 60) for k, n in enumerate(("max", "mid", "min"))]
    pd.DataFrame(evals).to_csv(run / "eval_log.csv", index=False)
    for name, settings in searches.items():
        result = run_search(space, evaluator, evaluator.cost, run / "search" / name, SearchSettings(**settings))
        if settings.get("algorithm") == "nsga2":  # as `supernet search` leaves it: final evaluation columns
            front = result.pareto.assign(val_accuracy=result.pareto["accuracy"], val_loss=0.3, val_examples=100,
                                         test_accuracy=result.pareto["accuracy"] - 0.01, test_loss=0.3,
                                         test_examples=200)
            front.to_csv(run / "search" / name / "pareto.csv", index=False)
    return run


SEARCHES = {
    "nsga2-acc-macs-s0": {"algorithm": "nsga2", "population": 10, "evaluations": 20},
    "random-acc-macs-s0": {"algorithm": "random", "population": 6, "evaluations": 18, "seed": 1},
    "midpoint-acc-macs-s0": {"algorithm": "midpoint"},
    "allocator-macs7.2e+08": {"algorithm": "allocator", "budget": ("macs", 7.2e8)},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("plots"), SEARCHES)


@pytest.fixture(scope="module")
def written(run) -> list[Path]:
    return plot_run(run)


def history(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / "search" / name / "history.csv")


def test_every_figure_is_a_valid_png_with_its_csv(run, written):
    from matplotlib.image import imread

    out = run / "plots"
    expected = {f"search_progress_{n}" for n in SEARCHES} | {"hypervolume", "training"}
    assert {p.name for p in written} == {f"{s}.{ext}" for s in expected for ext in ("png", "csv")}
    assert all(p.parent == out for p in written)
    # no temporary files left; the ledger lists what supernet wrote
    assert sorted(p.name for p in out.iterdir()) == sorted([LEDGER, *(p.name for p in written)])
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            image = imread(p)
            assert image.shape[0] >= 400 and image.shape[1] >= 600
            assert image[..., :3].std() > 0.05  # something is drawn
        else:
            assert len(pd.read_csv(p)) > 0


def test_progress_csv_holds_every_evaluation_and_the_front(run, written):
    for name in ("nsga2-acc-macs-s0", "random-acc-macs-s0"):
        frame = pd.read_csv(run / "plots" / f"search_progress_{name}.csv")
        ev = frame[frame["series"] == "evaluation"].reset_index(drop=True)
        h = history(run, name)
        assert list(ev["index"]) == list(h["index"]) and list(ev["generation"]) == list(h["generation"])
        np.testing.assert_allclose(ev["accuracy_percent"], 100 * h["accuracy"])
        np.testing.assert_allclose(ev["macs_millions"], h["macs"] / 1e6)
        front = set(pd.read_csv(run / "search" / name / "pareto.csv")["index"])
        assert set(ev.loc[ev["pareto"], "index"]) == front
        assert set(ev.loc[ev["front_line"], "index"]) == front  # two objectives: the whole front is drawn
        assert (ev["search"] == name).all()
    frame = pd.read_csv(run / "plots" / "search_progress_nsga2-acc-macs-s0.csv")
    assert frame.loc[frame["series"] == "evaluation", "generation"].nunique() == 2
    mid = frame[frame["series"] == "midpoint"]
    assert len(mid) == 1 and mid["search"].iloc[0] == "midpoint-acc-macs-s0"
    assert mid["accuracy_percent"].iloc[0] == pytest.approx(100 * history(run, "midpoint-acc-macs-s0")["accuracy"][0])
    alloc = frame[frame["series"] == "allocator"]
    selected = json.loads((run / "search" / "allocator-macs7.2e+08" / "selected.json").read_text())
    row = history(run, "allocator-macs7.2e+08").set_index("index").loc[selected["index"]]
    assert len(alloc) == 1 and alloc["index"].iloc[0] == selected["index"]
    assert json.loads(alloc["config"].iloc[0]) == selected["config"]
    assert alloc["macs_millions"].iloc[0] == pytest.approx(row["macs"] / 1e6)
    assert alloc["accuracy_percent"].iloc[0] == pytest.approx(100 * row["accuracy"])


def test_hypervolume_csv_is_monotone_and_ends_at_the_whole_history(run, written):
    frame = pd.read_csv(run / "plots" / "hypervolume.csv")
    assert set(frame["objectives"]) == {"acc,macs"}
    assert list(frame[["objective_1", "objective_2"]].iloc[0]) == ["obj_acc", "obj_macs"]
    ideal = frame[["ideal_1", "ideal_2"]].iloc[0].to_numpy()
    nadir = frame[["nadir_1", "nadir_2"]].iloc[0].to_numpy()
    np.testing.assert_allclose(frame[["reference_1", "reference_2"]].iloc[0], ideal + 1.1 * (nadir - ideal))
    curves = frame[frame["kind"] == "curve"]
    assert set(curves["search"]) == {"nsga2-acc-macs-s0", "random-acc-macs-s0"}
    everything = []
    for name, rows in curves.groupby("search"):
        h = history(run, name)
        F = h[["obj_acc", "obj_macs"]].to_numpy()
        everything.append(F)
        assert list(rows["evaluations"]) == list(range(1, len(h) + 1))
        assert np.all(np.diff(rows["hypervolume"]) >= 0)
        assert rows["hypervolume"].iloc[-1] == pytest.approx(hypervolume(F, ideal, nadir))
        assert 0 < rows["hypervolume"].iloc[-1] <= 1
    points = frame[frame["kind"] == "point"].set_index("search")
    assert set(points.index) == {"midpoint-acc-macs-s0", "allocator-macs7.2e+08"}
    assert points.loc["midpoint-acc-macs-s0", "evaluations"] == 1
    assert points.loc["allocator-macs7.2e+08", "evaluations"] == len(history(run, "allocator-macs7.2e+08"))
    mid = history(run, "midpoint-acc-macs-s0")[["obj_acc", "obj_macs"]].to_numpy()
    assert points.loc["midpoint-acc-macs-s0", "hypervolume"] == pytest.approx(hypervolume(mid, ideal, nadir))
    selected = json.loads((run / "search" / "allocator-macs7.2e+08" / "selected.json").read_text())
    alloc = history(run, "allocator-macs7.2e+08").set_index("index").loc[[selected["index"]], ["obj_acc", "obj_macs"]]
    everything = np.vstack([*everything, mid, alloc.to_numpy()])  # the common bounds: every plotted point
    np.testing.assert_allclose(ideal, everything.min(axis=0))
    np.testing.assert_allclose(nadir, everything.max(axis=0))


def test_training_csv_holds_loss_and_validation_accuracy(run, written):
    frame = pd.read_csv(run / "plots" / "training.csv")
    log = pd.read_csv(run / "train_log.csv")
    assert list(frame["step"]) == list(log["step"])
    np.testing.assert_allclose(frame["loss"], log["loss"])
    window = plots.smoothing_window(len(log))
    np.testing.assert_allclose(frame["loss_smoothed"], log["loss"].rolling(window, min_periods=1).mean())
    ev = pd.read_csv(run / "eval_log.csv")
    for subnet in ("max", "mid", "min"):
        column = frame.dropna(subset=[f"{subnet}_accuracy_percent"])
        rows = ev[ev["subnet"] == subnet]
        assert list(column["step"]) == list(rows["step"])
        np.testing.assert_allclose(column[f"{subnet}_accuracy_percent"], 100 * rows["accuracy"])


def test_search_option_restricts_the_output(run, tmp_path):
    files = plot_run(run, search="random-acc-macs-s0", out=tmp_path / "one")
    assert sorted(p.name for p in files) == ["search_progress_random-acc-macs-s0.csv",
                                             "search_progress_random-acc-macs-s0.png"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([LEDGER, *(p.name for p in files)])
    frame = pd.read_csv(files[1] if files[1].suffix == ".csv" else files[0])
    assert set(frame["series"]) == {"evaluation", "midpoint", "allocator"}  # references from the other searches


def test_midpoint_line_falls_back_to_a_history_row_with_the_mid_config(tmp_path):
    run = make_run(tmp_path, {"local": {"algorithm": "local", "population": 4, "evaluations": 12}})
    plot_run(run)
    frame = pd.read_csv(run / "plots" / "search_progress_local.csv")
    mid = frame[frame["series"] == "midpoint"]
    assert len(mid) == 1 and mid["search"].iloc[0] == "local"
    assert json.loads(mid["config"].iloc[0]) == {g: 24 for g in GROUPS}
    assert "allocator" not in set(frame["series"])


def test_no_midpoint_anywhere_means_no_line(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("plots", "midpoint-*", "allocator-*"))
    mid = json.dumps({g: 24 for g in GROUPS}, separators=(",", ":"))
    for name in SEARCHES:
        path = copy / "search" / name / "history.csv"
        if path.exists():
            h = pd.read_csv(path)
            h[h["config"] != mid].to_csv(path, index=False)
    plot_run(copy)
    frame = pd.read_csv(copy / "plots" / "search_progress_nsga2-acc-macs-s0.csv")
    assert set(frame["series"]) == {"evaluation"}
    assert set(pd.read_csv(copy / "plots" / "hypervolume.csv")["kind"]) == {"curve"}


def test_command_prints_the_files(run, tmp_path, capsys):
    args = build_parser().parse_args(["plot", "--run", str(run), "--search", "midpoint-acc-macs-s0",
                                      "--out", str(tmp_path)])
    assert plot_command.run(args) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert sorted(Path(f).name for f in line["files"]) == ["search_progress_midpoint-acc-macs-s0.csv",
                                                          "search_progress_midpoint-acc-macs-s0.png"]


def test_a_run_with_only_training_logs_gets_the_training_plot(tmp_path):
    run = make_run(tmp_path, {})
    assert sorted(p.name for p in plot_run(run)) == ["training.csv", "training.png"]


def _empty_run(run: Path) -> None:
    for f in ("train_log.csv", "eval_log.csv"):
        (run / f).unlink()
    shutil.rmtree(run / "search")


def _corrupt_history(run: Path) -> None:
    (run / "search" / "s" / "history.csv").write_text("index,generation,config,accuracy,obj_acc,obj_macs\n"
                                                      '0,1,"{}",0.5,high,3\n')


@pytest.mark.parametrize("damage, kwargs, match", [
    (lambda run: shutil.rmtree(run), {}, "does not exist"),
    (lambda run: (run / "config.json").unlink(), {}, "not a supernet run"),
    (lambda run: (run / "config.json").write_text("{"), {}, "corrupt"),
    (lambda run: None, {"search": "nope"}, "no search 'nope'"),
    (lambda run: None, {"search": "../s"}, "one plain folder name"),
    (_empty_run, {}, "nothing to plot"),
    (lambda run: (run / "train_log.csv").write_text("step,epoch\n1,0\n"), {}, "corrupt .*no column 'loss'"),
    (lambda run: (run / "train_log.csv").write_bytes(b"\x00\x01garbage"), {}, "binary"),
    (lambda run: (run / "eval_log.csv").write_text("step,subnet,accuracy\n1,max,oops\n"), {}, "not numeric"),
    (_corrupt_history, {}, "history file .*corrupt"),
    (lambda run: (run / "search" / "s" / "search.json").write_text("[]"), {}, "search file .*corrupt"),
    (lambda run: (run / "search" / "s" / "pareto.csv").write_text(""), {}, "Pareto file .*corrupt"),
    (lambda run: (run / "blocker").write_text("x"), {"out": "blocker"}, "not a folder"),
])
def test_bad_input_is_one_clear_error(tmp_path, damage, kwargs, match):
    run = make_run(tmp_path, {"s": {"algorithm": "random", "population": 4, "evaluations": 8}})
    damage(run)
    if "out" in kwargs:
        kwargs = {**kwargs, "out": run / kwargs["out"]}
    with pytest.raises(SupernetError, match=match):
        plot_run(run, **kwargs)
    assert not (run / "plots").exists()
