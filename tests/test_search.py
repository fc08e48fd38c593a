"""The search engine (supernet.search) on synthetic evaluators: no model, no training code."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from supernet.errors import SupernetError
from supernet.search import (
    GRID_LIMIT,
    OBJECTIVES,
    STRATEGIES,
    Encoding,
    SearchSettings,
    Variable,
    allocator_evaluations,
    greedy_allocation,
    hypervolume,
    hypervolume_curve,
    non_dominated,
    parse_budget,
    parse_constraint,
    resolve_objectives,
    run_search,
)
from supernet.space import SearchSpace

GROUPS = 5
WEIGHTS = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # accuracy gain of each group
COSTS = np.array([1.0, 3.0, 2.0, 5.0, 4.0])  # macs per rank of each group


def small_space(groups: int = GROUPS, choices=(32, 24, 16)) -> SearchSpace:
    return SearchSpace({f"L{i}.qkv": list(choices) for i in range(groups)})


def ranks(space: SearchSpace, config: dict) -> np.ndarray:
    return np.array([config[g] for g in space.groups], dtype=float)


class Synthetic:
    """Accuracy concave in each group's rank (weighted), macs/params linear: a known trade-off.

    Counts calls and, when ``fail_after`` is set, raises on the call after that many.
    """

    def __init__(self, space: SearchSpace, fail_after: int | None = None) -> None:
        self.space, self.fail_after, self.calls, self.low = space, fail_after, [], []
        n = len(space.groups)
        self.weights = np.resize(WEIGHTS, n)
        self.costs = np.resize(COSTS, n)

    def cost(self, config: dict) -> dict:
        r = ranks(self.space, config)
        return {"macs": float(1e6 + 1e3 * (self.costs * r).sum()), "params": float(100 * r.sum())}

    def at(self, config: dict, examples: int) -> dict:
        """The lower fidelities of ``halving``: the same metrics plus noise that shrinks with the
        examples (deterministic per config and examples)."""
        if self.fail_after is not None and len(self.calls) + len(self.low) >= self.fail_after:
            raise RuntimeError("killed")
        self.low.append((json.dumps(config), examples))
        exact = self.score(config)
        seed = abs(hash((json.dumps(config, sort_keys=True), examples))) % (2**32)
        noise = np.random.default_rng(seed).normal(0, 0.3 / np.sqrt(examples))
        return {**exact, "accuracy": exact["accuracy"] + noise, "loss": exact["loss"] - noise}

    def __call__(self, config: dict) -> dict:
        if self.fail_after is not None and len(self.calls) + len(self.low) >= self.fail_after:
            raise RuntimeError("killed")
        self.calls.append(json.dumps(config))
        return self.score(config)

    def score(self, config: dict) -> dict:
        r = ranks(self.space, config) / max(self.space.max_config().values())
        accuracy = 0.5 + 0.4 * float((self.weights * np.sqrt(r)).sum() / self.weights.sum())
        return {"accuracy": accuracy, "loss": 1.0 - accuracy, "latency": 0.001 * float(r.sum())}


def search(tmp_path: Path, name: str = "s", space: SearchSpace | None = None, fail_after: int | None = None,
           resume: bool = False, **settings):
    space = space or small_space()
    evaluator = Synthetic(space, fail_after)
    settings.setdefault("population", 6)
    settings.setdefault("evaluations", 30)
    result = run_search(space, evaluator, evaluator.cost, tmp_path / name, SearchSettings(**settings), resume=resume,
                        evaluate_at=evaluator.at, max_samples=SAMPLES)
    return result, evaluator


SAMPLES = 300  # the examples of one full evaluation (halving's top rung)


def full_evaluations(algorithm: str, budget: int) -> int:
    """Rows of history.csv a budgeted strategy ends with: its budget, or halving's top rung."""
    return budget // 3 if algorithm == "halving" else budget


def without_seconds(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["seconds"]).reset_index(drop=True)


# ---------------------------------------------------------------- encoding, constraints, objectives

def test_encode_decode_round_trip_and_grid_order():
    space = SearchSpace({"a": [16, 32, 24], "b": [8, 4], "c": [1]})
    enc = Encoding.from_space(space)
    assert enc.names == ["a", "b", "c"] and enc.size == 6
    assert enc.lower.tolist() == [0, 0, 0] and enc.upper.tolist() == [2, 1, 0]
    assert enc.encode(space.max_config()).tolist() == [0, 0, 0]  # index 0 = largest choice
    configs = list(enc.all_configs())
    assert [enc.config_at(i) for i in range(enc.size)] == configs
    assert len({enc.key(c) for c in configs}) == enc.size
    for config in configs:
        assert enc.decode(enc.encode(config)) == config
        assert space.validate(config) == config
    for x in itertools.product(range(3), range(2), range(1)):
        assert enc.encode(enc.decode(np.array(x, dtype=float))).tolist() == list(x)
    assert enc.neighbours({"a": 24, "b": 8, "c": 1}) == [
        {"a": 32, "b": 8, "c": 1}, {"a": 16, "b": 8, "c": 1}, {"a": 24, "b": 4, "c": 1}]
    with pytest.raises(SupernetError, match="outside"):
        enc.decode([3, 0, 0])
    with pytest.raises(SupernetError, match="not one of"):
        enc.encode({"a": 20, "b": 8, "c": 1})


def test_extra_variables_are_just_more_dimensions():
    enc = Encoding.from_space(small_space(2), extra=[Variable("scaling", (0, 1, 2))])
    assert enc.n_var == 3 and enc.size == 27
    config = {"L0.qkv": 24, "L1.qkv": 16, "scaling": 2}
    assert enc.decode(enc.encode(config)) == config


def test_parse_constraint():
    c = parse_constraint(" macs <= 7.6e8, params<1e6 ")
    assert [(b.metric, b.op, b.value) for b in c.bounds] == [("macs", "<=", 7.6e8), ("params", "<", 1e6)]
    assert c.violation({"macs": 7.6e8, "params": 5e5}) == 0
    assert c.violation({"macs": 7.6e8, "params": 1e6}) > 0  # strict
    assert c.violation({"macs": 8.36e8, "params": 0}) == pytest.approx(0.1)
    assert parse_constraint("params>=10,params>1").violation({"params": 5}) > 0
    assert parse_constraint(None) is None and parse_constraint("  ") is None
    with pytest.raises(SupernetError, match="does not give"):
        parse_constraint("flops<=1").violation({"macs": 1})


def test_objective_registry():
    assert {"acc", "loss", "macs", "params", "latency", "size"} <= set(OBJECTIVES)
    acc, macs = resolve_objectives("acc,macs")
    assert acc.value({"accuracy": 0.8}) == -0.8 and acc.raw(-0.8) == 0.8 and acc.column == "obj_acc"
    assert macs.value({"macs": 5.0}) == 5.0
    assert [o.name for o in resolve_objectives(["loss", "params", "latency"])] == ["loss", "params", "latency"]


def test_settings_json_round_trip():
    settings = SearchSettings(objectives="acc,params", algorithm="allocator", budget="params=1e6",
                              extra={"eval_samples": 500, "run": "runs/demo"})
    assert settings.objectives == ("acc", "params") and settings.budget == ("params", 1e6)
    assert SearchSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    with pytest.raises(SupernetError, match="unknown search settings: speed"):
        SearchSettings.from_json({"speed": 1})


def test_budget_parsing():
    assert parse_budget("macs=7.6e8") == ("macs", 7.6e8) == parse_budget("macs<=7.6e8")
    assert parse_budget(("params", 1_000_000)) == ("params", 1e6)


# ---------------------------------------------------------------- determinism, cache, budget

@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3", "smsemoa", "spea2", "random"])
def test_same_seed_same_history_different_seed_different(tmp_path, algorithm):
    a, _ = search(tmp_path, "a", algorithm=algorithm, seed=1)
    b, _ = search(tmp_path, "b", algorithm=algorithm, seed=1)
    c, _ = search(tmp_path, "c", algorithm=algorithm, seed=2)
    pd.testing.assert_frame_equal(without_seconds(a.history), without_seconds(b.history))
    assert a.history["config"].tolist() != c.history["config"].tolist()
    assert len(a.history) == len(c.history) == 30  # the budget counts unique evaluations exactly


@pytest.mark.parametrize("algorithm", ["nsga2", "smsemoa", "random", "local"])
def test_cache_prevents_reevaluation(tmp_path, algorithm):
    space = small_space(3)  # 27 configs: a 40-evaluation budget cannot be spent, proposals repeat
    result, evaluator = search(tmp_path, space=space, algorithm=algorithm, evaluations=40)
    assert len(evaluator.calls) == len(set(evaluator.calls)) == len(result.history) == result.evaluator_calls
    assert result.history["index"].tolist() == list(range(len(result.history)))
    if algorithm == "random":
        assert len(result.history) == space.size()
    again, evaluator = search(tmp_path, space=space, algorithm=algorithm, evaluations=40, resume=True)
    assert evaluator.calls == [] and again.evaluator_calls == 0
    pd.testing.assert_frame_equal(again.history, result.history)


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3", "random", "local", "grid", "allocator"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, algorithm):
    kw = {"algorithm": algorithm, "seed": 3, "evaluations": 24}
    if algorithm == "allocator":
        kw["budget"] = ("macs", 1.2e6)
    space = small_space(4)
    full, _ = search(tmp_path, "full", space=space, **kw)
    with pytest.raises(RuntimeError, match="killed"):
        search(tmp_path, "cut", space=space, fail_after=7, **kw)
    history = tmp_path / "cut" / "history.csv"
    killed = pd.read_csv(history)
    assert len(killed) == 7 and not (tmp_path / "cut" / "pareto.csv").exists()
    with history.open("a") as f:
        f.write('7,2,"{""L0.qkv"":16,""L1')  # killed mid-write: no newline
    resumed, evaluator = search(tmp_path, "cut", space=space, resume=True, **kw)
    assert len(evaluator.calls) == len(full.history) - 7
    pd.testing.assert_frame_equal(without_seconds(resumed.history), without_seconds(full.history))
    pd.testing.assert_frame_equal(resumed.history.iloc[:7], killed)  # old rows kept as written
    uninterrupted = pd.read_csv(tmp_path / "full" / "history.csv")
    pd.testing.assert_frame_equal(without_seconds(pd.read_csv(history)), without_seconds(uninterrupted))
    for name in ("pareto.csv",):
        a = pd.read_csv(tmp_path / "full" / name)
        b = pd.read_csv(tmp_path / "cut" / name)
        pd.testing.assert_frame_equal(without_seconds(a), without_seconds(b))
    if algorithm == "allocator":
        assert resumed.selected == full.selected


# ---------------------------------------------------------------- pareto and hypervolume

@pytest.mark.parametrize("objectives", [("acc", "macs"), ("loss", "params", "latency")])
def test_pareto_csv_is_exactly_the_non_dominated_subset(tmp_path, objectives):
    result, _ = search(tmp_path, algorithm="random", objectives=objectives, evaluations=60)
    history = pd.read_csv(tmp_path / "s" / "history.csv")
    pareto = pd.read_csv(tmp_path / "s" / "pareto.csv")
    columns = [f"obj_{o}" for o in objectives]
    F = history[columns].to_numpy()
    expected = [
        int(history["index"][i]) for i in range(len(F))
        if not any((F[j] <= F[i]).all() and (F[j] < F[i]).any() for j in range(len(F)))
    ]
    assert sorted(pareto["index"]) == sorted(expected)
    assert list(pareto.columns) == list(history.columns)
    merged = pareto.merge(history, on="index", suffixes=("", "_h"))
    assert (merged["config"] == merged["config_h"]).all()
    assert sorted(int(p.stem) for p in (tmp_path / "s" / "subnets").glob("*.json")) == sorted(expected)
    record = json.loads((tmp_path / "s" / "subnets" / f"{expected[0]}.json").read_text())
    assert set(record) == {"index", "config", "metrics", "objectives"}
    ordered = pareto[columns + ["index"]].to_numpy().tolist()
    assert ordered == sorted(ordered)  # deterministic order: objectives, then index


def test_non_dominated_keeps_ties():
    F = np.array([[1, 2], [1, 2], [2, 1], [2, 2], [0, 3], [3, 3]], dtype=float)
    assert non_dominated(F).tolist() == [True, True, True, False, True, False]


def test_hypervolume_values_and_curve(tmp_path):
    assert hypervolume(np.array([[0.0, 0.0]]), [0, 0], [1, 1]) == pytest.approx(1.0)
    two = hypervolume(np.array([[0.0, 1.0], [1.0, 0.0]]), [0, 0], [1, 1])
    assert two == pytest.approx((2 * 1.1 * 0.1 - 0.01) / 1.21)
    assert hypervolume(np.array([[2.0, 2.0]]), [0, 0], [1, 1]) == 0.0  # beyond the reference point
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), [0, 0, 0], [1, 1, 1]) == pytest.approx(0.6**3 / 1.1**3)
    result, _ = search(tmp_path, algorithm="random", evaluations=30)
    curve = hypervolume_curve(result.history, result.objective_columns)
    assert len(curve) == 30 and np.all(np.diff(curve) >= -1e-12)
    assert curve[-1] == pytest.approx(hypervolume(result.history[result.objective_columns].to_numpy()))


def test_nsga2_beats_random_on_hypervolume(tmp_path):
    """20 groups of 4 choices (1.1e12 configs): random samples crowd the middle of the front."""
    space = small_space(20, (8, 6, 4, 2))
    evaluator = Synthetic(space)
    ideal = [-evaluator(space.max_config())["accuracy"], evaluator.cost(space.min_config())["macs"]]
    nadir = [-evaluator(space.min_config())["accuracy"], evaluator.cost(space.max_config())["macs"]]
    mean = {}
    for algorithm in ("nsga2", "random"):
        values = []
        for seed in range(3):
            result, _ = search(tmp_path, f"{algorithm}{seed}", space=space, algorithm=algorithm, seed=seed,
                               population=20, evaluations=400)
            values.append(hypervolume(result.history[result.objective_columns].to_numpy(), ideal, nadir))
        mean[algorithm] = np.mean(values)
    assert mean["nsga2"] > mean["random"] + 0.01


# ---------------------------------------------------------------- strategies

@pytest.mark.parametrize("algorithm", sorted(STRATEGIES))
def test_every_strategy_returns_a_front(tmp_path, algorithm):
    kw = {"budget": ("params", 9000)} if algorithm == "allocator" else {}
    result, evaluator = search(tmp_path, space=small_space(4), algorithm=algorithm, evaluations=20, **kw)
    assert len(result.pareto) > 0 and len(evaluator.calls) == len(result.history)
    if STRATEGIES[algorithm].budgeted:
        assert len(result.history) == full_evaluations(algorithm, 20)
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["settings"]["algorithm"] == algorithm and saved["space"] == small_space(4).to_json()


@pytest.mark.parametrize("algorithm", [name for name, s in STRATEGIES.items() if s.budgeted])
def test_three_objectives_with_a_constraint(tmp_path, algorithm):
    search(tmp_path, "warm-up", algorithm=algorithm, objectives=("acc", "macs"))  # no state leaks between runs
    result, evaluator = search(tmp_path, space=small_space(4), algorithm=algorithm, population=4, evaluations=16,
                               objectives=("loss", "params", "latency"), constraint="macs<=1.3e6")
    assert len(result.history) == full_evaluations(algorithm, 16) and (result.history["macs"] <= 1.3e6).all()
    assert len(result.pareto) > 0
    assert all(evaluator.cost(json.loads(c))["macs"] <= 1.3e6 for c, _ in evaluator.low)  # no rung either


def test_no_feasible_configuration_is_an_error(tmp_path):
    with pytest.raises(SupernetError, match="no configuration satisfies the constraint macs<=1 .*nothing was written"):
        search(tmp_path, algorithm="random", constraint="macs<=1")
    assert not (tmp_path / "s").exists()  # refused before anything is written: the name stays free


def test_grid_visits_every_configuration_once_in_order(tmp_path):
    space = small_space(4)
    result, evaluator = search(tmp_path, space=space, algorithm="grid", evaluations=6)
    expected = [json.dumps(c, separators=(",", ":")) for c in Encoding.from_space(space).all_configs()]
    assert result.history["config"].tolist() == expected and len(set(expected)) == space.size() == 81
    assert len(evaluator.calls) == 81


def test_midpoint_evaluates_exactly_one_config(tmp_path):
    space = SearchSpace({"a": [32, 24, 16], "b": [8, 6, 4, 2]})
    result, evaluator = search(tmp_path, space=space, algorithm="midpoint")
    assert len(evaluator.calls) == 1 and json.loads(result.history["config"][0]) == space.mid_config()


@pytest.mark.parametrize("algorithm", ["nsga2", "random", "grid", "local"])
def test_constraint_skips_infeasible_configs(tmp_path, algorithm):
    space = small_space(4)
    evaluator = Synthetic(space)
    limit = evaluator.cost(space.mid_config())["macs"]
    result, evaluator = search(tmp_path, space=space, algorithm=algorithm, constraint=f"macs<={limit!r}",
                               evaluations=24)
    assert len(result.history) > 0 and (result.history["macs"] <= limit).all()
    assert all(evaluator.cost(json.loads(c))["macs"] <= limit for c in evaluator.calls)
    if algorithm == "grid":
        feasible = [c for c in Encoding.from_space(space).all_configs() if evaluator.cost(c)["macs"] <= limit]
        assert len(result.history) == len(feasible)


# ---------------------------------------------------------------- allocator

@pytest.mark.parametrize("key,limit", [("macs", 1.25e6), ("macs", 1.3e6), ("macs", 1.4e6), ("params", 9100),
                                       ("params", 12000), ("params", 16000)])
def test_allocator_stays_within_budget(tmp_path, key, limit):
    space = small_space()
    result, evaluator = search(tmp_path, space=space, algorithm="allocator", budget=(key, limit))
    chosen = result.selected["config"]
    assert evaluator.cost(chosen)[key] <= limit
    assert len(evaluator.calls) == len(result.history) == allocator_evaluations(space, chosen)
    assert len(result.history) in (1 + GROUPS * 2, 2 + GROUPS * 2)
    assert json.loads((tmp_path / "s" / "selected.json").read_text())["config"] == chosen


def test_allocator_matches_brute_force_on_additive_toy(tmp_path):
    """3 groups, every step costs 10 macs, additive concave gains: greedy by ratio is optimal."""
    space = SearchSpace({"a": [4, 3, 2, 1], "b": [4, 3, 2, 1], "c": [4, 3, 2, 1]})
    gain = {"a": [0.30, 0.20, 0.05], "b": [0.25, 0.10, 0.08], "c": [0.12, 0.11, 0.01]}  # per step up from 1

    def loss(config):
        return 2.0 - sum(sum(gain[g][: config[g] - 1]) for g in gain)

    def cost(config):
        return {"macs": 100.0 + 10 * sum(config.values()), "params": float(sum(config.values()))}

    def evaluate(config):
        return {"accuracy": 1 - loss(config) / 2, "loss": loss(config)}

    configs = [dict(zip("abc", v, strict=True)) for v in itertools.product([4, 3, 2, 1], repeat=3)]
    for limit in (130, 140, 150, 165, 180, 200, 220):
        result = run_search(space, evaluate, cost, tmp_path / str(limit),
                            SearchSettings(algorithm="allocator", budget=("macs", limit)))
        chosen = result.selected["config"]
        best = min(loss(c) for c in configs if cost(c)["macs"] <= limit)
        assert cost(chosen)["macs"] <= limit and loss(chosen) == pytest.approx(best)
        assert result.selected["gains"] == {g: pytest.approx(v) for g, v in gain.items()}


def test_greedy_allocation_skips_steps_that_do_not_fit():
    space = SearchSpace({"a": [3, 2, 1], "b": [3, 2, 1]})
    gains = {"a": [50.0, 50.0], "b": [1.0, 1.0]}  # ratio 5 per macs for a, 1 for b
    weights = {"a": 10.0, "b": 1.0}

    def cost(config):
        return sum(weights[g] * config[g] for g in config)

    config, steps = greedy_allocation(space, gains, cost, limit=22.0)  # min costs 11; a's step 10, b's 1
    assert config == {"a": 2, "b": 2} and cost(config) == 22  # a's second step no longer fits; b fills
    assert [(s.group, s.before, s.after, s.cost) for s in steps] == [("a", 1, 2, 10.0), ("b", 1, 2, 1.0)]


# ---------------------------------------------------------------- bad input

BAD_SETTINGS = [
    ({"objectives": ("acc", "bogus")}, "unknown objective 'bogus'"),
    ({"objectives": ("acc",)}, "at least two objectives"),
    ({"objectives": "acc,macs,acc"}, "more than once"),
    ({"algorithm": "annealing"}, "unknown algorithm 'annealing'"),
    ({"population": 1}, "population must be at least 2"),
    ({"population": "8"}, "population must be an integer"),
    ({"population": 10, "evaluations": 5}, r"evaluations \(5\) must be at least the population \(10\)"),
    ({"constraint": "macs<<5"}, "malformed constraint"),
    ({"constraint": "macs<=lots"}, "malformed constraint"),
    ({"constraint": "<=5"}, "malformed constraint"),
    ({"algorithm": "allocator"}, "needs a budget"),
    ({"algorithm": "nsga2", "budget": ("macs", 1e6)}, "only to the allocator"),
    ({"algorithm": "allocator", "budget": "macs"}, "malformed budget"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_bad_settings(settings, message):
    with pytest.raises(SupernetError, match=message):
        SearchSettings(**settings)


@pytest.mark.parametrize("settings,message", [
    ({"algorithm": "allocator", "budget": ("macs", 1.0)}, "below the minimum configuration"),
    ({"algorithm": "allocator", "budget": ("flops", 1e9)}, "unknown budget metric 'flops'"),
    ({"constraint": "flops<=1e9"}, "constraint on 'flops'"),
    ({"algorithm": "midpoint", "constraint": "macs<=1.3e6"}, "midpoint violates the constraint"),
    ({"algorithm": "nsga2", "constraint": "macs<=1"}, "no configuration satisfies the constraint macs<=1"),
])
def test_bad_search_input_writes_nothing(tmp_path, settings, message):
    with pytest.raises(SupernetError, match=message):
        search(tmp_path, **settings)
    assert not (tmp_path / "s").exists()


def test_grid_refuses_a_large_space(tmp_path):
    space = small_space(8)  # 3^8 = 6561
    assert space.size() > GRID_LIMIT
    with pytest.raises(SupernetError, match="grid search over 6561 configurations refused"):
        search(tmp_path, space=space, algorithm="grid")


def test_search_needs_a_cost_function_for_constraints(tmp_path):
    space = small_space(3)
    with pytest.raises(SupernetError, match="needs a cost function"):
        run_search(space, Synthetic(space), None, tmp_path / "s", SearchSettings(constraint="macs<=1e9"))


def test_directory_rules(tmp_path):
    with pytest.raises(SupernetError, match="cannot resume: .* holds no search"):
        search(tmp_path, "missing", resume=True)
    search(tmp_path, "s", algorithm="random")
    with pytest.raises(SupernetError, match="already holds this search; use --resume"):
        search(tmp_path, "s", algorithm="random")
    with pytest.raises(SupernetError, match="holds a search with different settings .*seed"):
        search(tmp_path, "s", algorithm="random", seed=5)
    with pytest.raises(SupernetError, match="cannot resume .* with different settings .*evaluations"):
        search(tmp_path, "s", algorithm="random", evaluations=31, resume=True)
    with pytest.raises(SupernetError, match="cannot resume .* with different settings .*extra"):
        search(tmp_path, "s", algorithm="random", extra={"eval_samples": 10}, resume=True)
    with pytest.raises(SupernetError, match="search space differs"):
        search(tmp_path, "s", space=small_space(4), algorithm="random", resume=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SupernetError, match="not an empty directory"):
        search(tmp_path, "other")
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_history_columns_and_progress_bar(tmp_path):
    space = small_space(3)
    evaluator = Synthetic(space)
    result = run_search(space, evaluator, evaluator.cost, tmp_path / "s",
                        SearchSettings(objectives=("acc", "macs", "latency"), population=4, evaluations=8),
                        progress=True)
    header = (tmp_path / "s" / "history.csv").read_text().splitlines()[0].split(",")
    assert header == ["index", "generation", "config", "accuracy", "loss", "latency", "macs", "params",
                      "obj_acc", "obj_macs", "obj_latency", "seconds"]
    assert list(result.history.columns) == header and result.history["generation"].min() == 1
    assert (result.history["obj_acc"] == -result.history["accuracy"]).all()


def test_evaluator_must_return_the_objective_metrics(tmp_path):
    space = small_space(2)
    with pytest.raises(SupernetError, match="needs metric 'accuracy'"):
        run_search(space, lambda c: {"loss": 1.0}, None, tmp_path / "s", SearchSettings(population=2, evaluations=2))


# ---------------------------------------------------------------- multi-fidelity


def test_halving_stays_within_the_forward_passes_of_nsga2(tmp_path):
    from supernet.search.halving import examples_scored, plan

    assert plan(24, 300) == [(72, 33), (24, 100), (8, 300)] and examples_scored(plan(24, 300)) <= 24 * 300
    result, evaluator = search(tmp_path, space=small_space(5), algorithm="halving", evaluations=24, seed=2)
    scored = sum(e for _, e in evaluator.low) + SAMPLES * len(evaluator.calls)
    assert 0.95 * 24 * SAMPLES <= scored <= 24 * SAMPLES
    assert len(result.history) == 8 and len({c for c, _ in evaluator.low}) == 72
    rungs = pd.read_csv(tmp_path / "s" / "rungs.csv")
    assert rungs.groupby("rung")["examples"].agg(["first", "size"]).values.tolist() == [[33, 72], [100, 24]]
    # promotion works: the configurations that reach the top rung lie on the true front of the
    # starting ones far more often than the starting ones do
    start = [json.loads(c) for c in rungs.loc[rungs["rung"] == 0, "config"]]
    F = np.array([[-evaluator.score(c)["accuracy"], evaluator.cost(c)["macs"]] for c in start])
    on_front = {json.dumps(c, sort_keys=True) for c, keep in zip(start, non_dominated(F), strict=True) if keep}
    top = [json.dumps(json.loads(c), sort_keys=True) for c in result.history["config"]]
    assert sum(c in on_front for c in top) / len(top) > 2 * len(on_front) / len(start)


def test_halving_resumes_exactly(tmp_path):
    kw = {"algorithm": "halving", "evaluations": 24, "seed": 5}
    full, first = search(tmp_path, "full", **kw)
    with pytest.raises(RuntimeError, match="killed"):
        search(tmp_path, "cut", fail_after=50, **kw)
    assert not (tmp_path / "cut" / "history.csv").exists() and (tmp_path / "cut" / "rungs.csv").is_file()
    resumed, again = search(tmp_path, "cut", resume=True, **kw)
    assert len(again.low) + len(again.calls) == len(first.low) + len(first.calls) - 50
    pd.testing.assert_frame_equal(without_seconds(resumed.history), without_seconds(full.history))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "rungs.csv").drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "full" / "rungs.csv").drop(columns="seconds"))


def test_halving_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(SupernetError, match="at least 3"):
        search(tmp_path, algorithm="halving", evaluations=2, population=2)
    space = small_space()
    evaluator = Synthetic(space)
    with pytest.raises(SupernetError, match="chosen number of examples"):
        run_search(space, evaluator, evaluator.cost, tmp_path / "x", SearchSettings(algorithm="halving"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()
