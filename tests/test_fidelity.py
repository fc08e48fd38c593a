"""Ranking fidelity: rank statistics, accuracy intervals, the configurations a study trains, the
zero-cost proxies, stand-alone (fixed) training and the ``supernet fidelity`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli
from scipy.stats import binomtest, kendalltau, spearmanr
from test_export import make_net

from supernet.fidelity import accuracy_interval, pick_configs, proxies, rank_agreement


def test_rank_agreement_on_known_rankings():
    same = rank_agreement([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert same["kendall_tau"] == pytest.approx(1.0) and same["spearman_rho"] == pytest.approx(1.0)
    reverse = rank_agreement([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert reverse["kendall_tau"] == pytest.approx(-1.0) and reverse["spearman_rho"] == pytest.approx(-1.0)
    one_swap = rank_agreement([1, 2, 3, 4], [1, 3, 2, 4])  # 5 concordant pairs, 1 discordant
    assert one_swap["kendall_tau"] == pytest.approx(4 / 6)
    assert one_swap["spearman_rho"] == pytest.approx(1 - 6 * 2 / (4 * 15))  # sum d^2 = 2
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=12), rng.normal(size=12)
    got = rank_agreement(x, y, seed=1)
    assert got["kendall_tau"] == pytest.approx(kendalltau(x, y).statistic)
    assert got["spearman_rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert got["kendall_tau_low"] <= got["kendall_tau"] <= got["kendall_tau_high"]
    assert rank_agreement(x, y, seed=1) == got  # the bootstrap is seeded
    assert rank_agreement(x, y, seed=2)["kendall_tau_low"] != got["kendall_tau_low"]


@pytest.mark.parametrize(("k", "n"), [(0, 10), (7, 10), (246, 300), (300, 300), (1, 1)])
def test_accuracy_interval_is_the_binomial_wilson_interval(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = accuracy_interval(k / n, n)
    assert low == pytest.approx(ref.low, abs=1e-9) and high == pytest.approx(ref.high, abs=1e-9)
    assert all(math.isnan(v) for v in accuracy_interval(0.5, 0))


def test_pick_configs_spreads_over_macs_and_is_seeded():
    net = make_net("llama", layers=4)
    picked = pick_configs(net, 8, seed=0, seq_len=16)
    labels = [label for label, _ in picked]
    assert labels[:3] == ["max", "min", "mid"] and len(picked) == 8
    assert len({json.dumps(c, sort_keys=True) for _, c in picked}) == 8
    spread = [net.macs(c, 16) for label, c in picked if label.startswith("spread")]
    assert spread == sorted(spread) and spread[0] < spread[-1]
    assert pick_configs(net, 8, seed=0, seq_len=16) == picked
    assert pick_configs(net, 8, seed=1, seq_len=16) != picked


def test_proxies_are_deterministic_and_tell_configurations_apart():
    net = make_net("bert")
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}
    a = proxies(net, batch, net.max_config())
    b = proxies(net, batch, net.max_config())
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert a["grad_norm"] > 0 and a["snip"] > 0 and math.isfinite(a["loss"])
    low = proxies(net, batch, net.min_config())
    assert low["grad_norm"] != a["grad_norm"] and low["snip"] != a["snip"]
    assert all(p.grad is None for p in net.model.parameters())  # nothing left behind for a trainer


def test_a_fixed_run_trains_one_configuration(capsys, tiny_train_args, tmp_path):
    from supernet.train import TrainConfig, train

    args = dict(zip([a.lstrip("-").replace("-", "_") for a in tiny_train_args[::2]], tiny_train_args[1::2],
                    strict=True))
    cfg = TrainConfig.from_dict({**args, "name": "fixed"})
    fixed = {"L0.qkv": 6, "L0.attention.output.dense": 4, "L0.intermediate.dense": 8, "L0.output.dense": 6,
             "L1.qkv": 4, "L1.attention.output.dense": 8, "L1.intermediate.dense": 6, "L1.output.dense": 4}
    cfg.fixed = fixed
    train(cfg)
    log = pd.read_csv(Path(cfg.out) / "fixed" / "train_log.csv")
    assert all(json.loads(c) == fixed for c in log["config"])
    evals = pd.read_csv(Path(cfg.out) / "fixed" / "eval_log.csv")
    assert set(evals["subnet"]) == {"fixed"}


def test_fidelity_command_trains_resumes_and_reports(capsys, tiny_train_args, tmp_path):
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "r", "--max-steps", "30", "--lr", "1e-2",
                       "--eval-every", "30", "--save-every", "10", "--sampler", "sandwich", "--sandwich-random", "1",
                       "--distill", "inplace")
    assert code == 0, err
    run = Path(tiny_train_args[tiny_train_args.index("--out") + 1]) / "r"
    code, out, err = cli(capsys, "fidelity", "--run", run, "--configs", "4")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    d = run / "fidelity" / "n4-s0"
    rows = pd.read_csv(d / "fidelity.csv")
    assert len(rows) == 4 and list(rows["label"][:3]) == ["max", "min", "mid"]
    assert rows["supernet_low"].le(rows["supernet_accuracy"]).all()
    assert rows["standalone_accuracy"].between(0, 1).all() and (rows["standalone_examples"] == 40).all()
    report = json.loads((d / "fidelity.json").read_text())
    assert rows["standalone_accuracy"].nunique() > 1 and rows["supernet_accuracy"].nunique() > 1
    assert report["supernet"]["kendall_tau"] == pytest.approx(
        kendalltau(rows["supernet_accuracy"], rows["standalone_accuracy"]).statistic)
    assert set(report["proxies"]) == {"grad_norm", "snip", "loss"} and summary["configs"] == 4
    assert (d / "fidelity.png").stat().st_size > 1000
    for i, config in enumerate(rows["config"]):  # each stand-alone run trained its configuration only
        log = pd.read_csv(d / "standalone" / str(i) / "train_log.csv")
        assert all(json.loads(c) == json.loads(config) for c in log["config"])
        options = json.loads((d / "standalone" / str(i) / "config.json").read_text())["train"]
        assert (options["max_steps"], options["lr"], options["seed"]) == (30, 0.01, 0)  # the run's recipe
        assert (options["sampler"], options["distill"]) == ("uniform", "none")  # no sampling, no teacher

    # resume: a finished stand-alone run is not trained again; a missing row is scored again, equal
    stamps = {i: (d / "standalone" / str(i) / "adapter.safetensors").stat().st_mtime_ns for i in range(4)}
    rows.iloc[:3].to_csv(d / "fidelity.csv", index=False)
    code, _, err = cli(capsys, "fidelity", "--run", run, "--configs", "4")
    assert code == 0, err
    again = pd.read_csv(d / "fidelity.csv")
    pd.testing.assert_frame_equal(again.drop(columns=["proxy_seconds"]), rows.drop(columns=["proxy_seconds"]))
    assert {i: (d / "standalone" / str(i) / "adapter.safetensors").stat().st_mtime_ns for i in range(4)} == stamps

    code, _, err = cli(capsys, "fidelity", "--run", run, "--configs", "5", "--name", "n4-s0")
    assert_refused(code, err, "other settings")
    for extra, message in ((["--configs", "2"], "--configs"), (["--seed", "-1"], "--seed"),
                           (["--eval-samples", "0"], "--eval-samples"), (["--name", "../x"], "--name")):
        code, _, err = cli(capsys, "fidelity", "--run", run, *extra)
        assert_refused(code, err, message)
    code, _, err = cli(capsys, "fidelity", "--run", tmp_path / "nothing")
    assert code == 2 and err.count("\n") == 1


def test_proxies_as_search_objectives(capsys, tiny_train_args, tmp_path):
    """``--objectives acc,grad_norm,batch_loss``: the history holds each configuration's proxies,
    equal to supernet.fidelity.proxies on the run's first training batch."""
    from supernet.commands.search import proxy_batch
    from supernet.loader import load_run

    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "p")
    assert code == 0, err
    run = Path(tiny_train_args[tiny_train_args.index("--out") + 1]) / "p"
    code, _, err = cli(capsys, "search", "--run", run, "--objectives", "acc,grad_norm,batch_loss", "--population",
                       "4", "--evaluations", "6", "--eval-samples", "16", "--name", "z")
    assert code == 0, err
    history = pd.read_csv(run / "search" / "z" / "history.csv")
    setup, _ = load_run(run)
    batch = proxy_batch(setup, torch.device("cpu"))
    for row in history.itertuples():
        ref = proxies(setup.net, batch, json.loads(row.config))
        assert row.grad_norm == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert row.batch_loss == pytest.approx(ref["loss"], rel=1e-5)
        assert row.obj_grad_norm == pytest.approx(-row.grad_norm)  # maximised
    assert history["grad_norm"].nunique() > 1


def test_front_confirmation_demotes_and_promotes_on_the_whole_split():
    from supernet.front import candidates, confirm, with_search_interval

    history = pd.DataFrame({"index": [0, 1, 2, 3], "config": ["{}"] * 4,
                            "accuracy": [0.80, 0.78, 0.50, 0.70], "macs": [10.0, 10.0, 12.0, 5.0]})
    history["obj_acc"], history["obj_macs"] = -history["accuracy"], history["macs"]
    history = with_search_interval(history, 300)  # +/- about 4.5 points
    members = [0, 3]  # 1 is beaten by 0 within the noise, 2 by far
    picked = candidates(history, members, ["obj_acc", "obj_macs"])
    assert picked == [0, 3, 1]
    scored = history[history["index"].isin(picked)].assign(val_accuracy=[0.75, 0.79, 0.70], val_loss=0.5)
    status = dict(zip(scored["index"], confirm(scored, ["acc", "macs"], members)["status"], strict=True))
    assert status == {0: "demoted", 1: "promoted", 3: "kept"}
    # with the search's own scores nothing changes
    same = scored.assign(val_accuracy=scored["accuracy"])
    assert set(confirm(same, ["acc", "macs"], members)["status"]) == {"kept", "beaten"}
