"""Search strategies by name (``--algorithm``); every evaluation goes through ``ctx.evaluate_many``.

The pymoo algorithms run through pymoo's ask-and-tell interface on integer variables
(``IntegerRandomSampling``, SBX and polynomial mutation on floats rounded by ``RoundingRepair``,
duplicate elimination). A constraint becomes one inequality ``G`` (its relative violation):
pymoo ranks infeasible individuals by ``G`` alone, so they are never evaluated and get a
placeholder ``F``. The other strategies skip infeasible configurations. NSGA-III uses
Das-Dennis reference directions, as many as fit in the population (at least one per objective;
the population is raised to that). A pymoo search ends when the budget is spent, every
configuration was seen, or ``MAX_STALLED_GENERATIONS`` generations in a row brought nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from supernet.errors import SupernetError

from .pareto import non_dominated

if TYPE_CHECKING:
    from .context import SearchContext

#: ``grid`` refuses spaces with more configurations than this.
GRID_LIMIT = 4096
#: ``random`` draws a full permutation up to this many configurations, else samples with rejection.
PERMUTATION_LIMIT = 1 << 20
#: A pymoo search stops after this many generations in a row without one new evaluation.
MAX_STALLED_GENERATIONS = 100
#: Objective values given to pymoo for infeasible (never evaluated) individuals.
INFEASIBLE_F = 1e30


@dataclass(frozen=True)
class Strategy:
    """A registry entry.

    Attributes:
        run: ``run(ctx)`` proposes configurations and evaluates them through ``ctx.evaluate_many``.
        budgeted: whether ``settings.evaluations`` limits it (grid, midpoint and the allocator
            decide their own number of evaluations).
        description: one line for ``--help``.
        check: optional ``check(ctx)`` run before anything is written; raises SupernetError on bad input.
    """

    run: Callable[[SearchContext], None]
    budgeted: bool
    description: str
    check: Callable[[SearchContext], None] | None = None


# ---------------------------------------------------------------- pymoo

def _integer_operators() -> dict:
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    return dict(sampling=IntegerRandomSampling(),
                crossover=SBX(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
                mutation=PM(eta=3.0, vtype=float, repair=RoundingRepair()),
                eliminate_duplicates=True)


def _reference_directions(n_obj: int, population: int) -> np.ndarray:
    """Das-Dennis directions: the most partitions whose number of points fits in the population."""
    from pymoo.util.ref_dirs import get_reference_directions

    partitions = 1
    while math.comb(partitions + n_obj, n_obj - 1) <= population:
        partitions += 1
    return get_reference_directions("das-dennis", n_obj, n_partitions=partitions)


# pymoo's constructors take default survival/selection objects created once at import time and
# shared by every instance (SPEA2's keeps normalisation state); each search builds fresh ones.

def _nsga2(population: int, n_obj: int):
    from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding, binary_tournament
    from pymoo.operators.selection.tournament import TournamentSelection

    return NSGA2(pop_size=population, selection=TournamentSelection(func_comp=binary_tournament),
                 survival=RankAndCrowding(), **_integer_operators())


def _nsga3(population: int, n_obj: int):
    from pymoo.algorithms.moo.nsga3 import NSGA3, comp_by_cv_then_random
    from pymoo.operators.selection.tournament import TournamentSelection

    ref_dirs = _reference_directions(n_obj, population)
    return NSGA3(ref_dirs=ref_dirs, pop_size=max(population, len(ref_dirs)),
                 selection=TournamentSelection(func_comp=comp_by_cv_then_random), **_integer_operators())


def _smsemoa(population: int, n_obj: int):
    from pymoo.algorithms.moo.sms import SMSEMOA, LeastHypervolumeContributionSurvival, cv_and_dom_tournament
    from pymoo.operators.selection.tournament import TournamentSelection

    return SMSEMOA(pop_size=population, selection=TournamentSelection(func_comp=cv_and_dom_tournament),
                   survival=LeastHypervolumeContributionSurvival(), **_integer_operators())


def _spea2(population: int, n_obj: int):
    from pymoo.algorithms.moo.spea2 import SPEA2, SPEA2Survival, spea_binary_tournament
    from pymoo.operators.selection.tournament import TournamentSelection

    return SPEA2(pop_size=population, selection=TournamentSelection(spea_binary_tournament),
                 survival=SPEA2Survival(normalize=True), **_integer_operators())


def _pymoo_strategy(factory: Callable) -> Callable[[SearchContext], None]:
    def run(ctx: SearchContext) -> None:
        _run_pymoo(ctx, factory)

    return run


def _run_pymoo(ctx: SearchContext, factory: Callable) -> None:
    """Ask-and-tell until the budget is spent, the space is exhausted or the search stalls."""
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.core.termination import NoTermination
    from pymoo.problems.static import StaticProblem

    enc, n_obj = ctx.encoding, len(ctx.objectives)
    n_ieq = 0 if ctx.constraint is None else 1
    problem = Problem(n_var=enc.n_var, n_obj=n_obj, n_ieq_constr=n_ieq, xl=enc.lower, xu=enc.upper, vtype=int)
    algorithm = factory(ctx.settings.population, n_obj)
    algorithm.setup(problem, seed=ctx.settings.seed, termination=NoTermination())
    generation = stalled = 0
    while not ctx.done() and stalled < MAX_STALLED_GENERATIONS:
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:
            break
        generation += 1
        configs = [enc.decode(x) for x in pop.get("X")]
        before = ctx.count
        records = ctx.evaluate_many(configs, generation)
        if ctx.done():
            break  # budget spent (possibly inside this generation) or space exhausted: nothing left to tell
        F = np.array([r.objectives if r is not None else [INFEASIBLE_F] * n_obj for r in records], dtype=float)
        out = {"F": F}
        if n_ieq:
            out["G"] = np.array([[ctx.violation(c)] for c in configs], dtype=float)
        Evaluator(skip_already_evaluated=False).eval(StaticProblem(problem, **out), pop)
        algorithm.tell(infills=pop)
        stalled = 0 if ctx.count > before else stalled + 1


# ---------------------------------------------------------------- random, grid, midpoint, local

def _batches(ctx: SearchContext, configs) -> None:
    """Evaluate an iterable of configs in batches of ``population``, one generation each, until done."""
    batch, generation = [], 0
    for config in configs:
        batch.append(config)
        if len(batch) == ctx.settings.population:
            generation += 1
            ctx.evaluate_many(batch, generation)
            batch = []
            if ctx.done():
                return
    if batch:
        ctx.evaluate_many(batch, generation + 1)


def _random_configs(ctx: SearchContext):
    """Uniform random configurations without repeats (a seeded permutation, or rejection on huge spaces)."""
    rng = np.random.default_rng(ctx.settings.seed)
    enc = ctx.encoding
    if enc.size <= PERMUTATION_LIMIT:
        for flat in rng.permutation(enc.size):
            yield enc.config_at(int(flat))
        return
    seen: set[str] = set()
    misses = 0
    while misses < 1000 * ctx.settings.population:
        config = enc.decode(rng.integers(0, enc.upper + 1))
        key = enc.key(config)
        misses = misses + 1 if key in seen else 0
        if key not in seen:
            seen.add(key)
            yield config


def run_random(ctx: SearchContext) -> None:
    """Uniform random sampling without repeats, in batches of ``population``."""
    _batches(ctx, _random_configs(ctx))


def check_grid(ctx: SearchContext) -> None:
    if ctx.encoding.size > GRID_LIMIT:
        raise SupernetError(
            f"grid search over {ctx.encoding.size} configurations refused (the limit is {GRID_LIMIT}); "
            "use nsga2 or random"
        )


def run_grid(ctx: SearchContext) -> None:
    """Every configuration once, in ``Encoding.all_configs`` order (first group slowest, largest choice first)."""
    check_grid(ctx)
    _batches(ctx, ctx.encoding.all_configs())


def _feasible_start(ctx: SearchContext, what: str) -> dict:
    config = ctx.space.mid_config()
    if ctx.violation(config) > 0:
        raise SupernetError(f"{what}: the midpoint violates the constraint {ctx.constraint}")
    return config


def run_midpoint(ctx: SearchContext) -> None:
    """Exactly one evaluation: the heuristic midpoint ``SearchSpace.mid_config()``."""
    ctx.evaluate_many([_feasible_start(ctx, "midpoint")], 1)


def run_local(ctx: SearchContext) -> None:
    """Pareto local search from the midpoint.

    Keeps the non-dominated archive of everything evaluated; repeatedly takes the archive
    member with the lowest index not yet expanded and evaluates its neighbours (one group moved
    by one step) as one generation. Stops when the budget is spent or every archive member was
    expanded (a Pareto local optimum).
    """
    start = _feasible_start(ctx, "local search")
    ctx.evaluate_many([start], 1)
    expanded: set[int] = set()
    generation = 1
    while not ctx.done():
        records = ctx.records
        front = non_dominated(np.array([r.objectives for r in records], dtype=float))
        todo = [r for r, keep in zip(records, front, strict=True) if keep and r.index not in expanded]
        if not todo:
            return
        member = min(todo, key=lambda r: r.index)
        expanded.add(member.index)
        generation += 1
        ctx.evaluate_many(ctx.encoding.neighbours(member.config), generation)


# ---------------------------------------------------------------- regularized evolution, Bayesian optimisation

def run_morea(ctx: SearchContext) -> None:
    """Multi-objective regularized evolution (syne-tune's MOREA, after Real et al. 2019).

    A queue of the ``population`` most recent evaluations; each generation makes ``population``
    children, each a one-group mutation of the best (lowest non-domination rank, then oldest)
    of ``max(2, population // 4)`` members drawn from the queue; children join the queue and
    the oldest members leave it. The first generation is uniform random.
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    rng = np.random.default_rng(ctx.settings.seed)
    enc, population = ctx.encoding, ctx.settings.population
    sample = max(2, population // 4)
    first = [r for r in ctx.evaluate_many(list(_take(_random_configs(ctx), population)), 1) if r is not None]
    queue = list(first)
    generation = stalled = 0
    while not ctx.done() and queue and stalled < MAX_STALLED_GENERATIONS:
        generation += 1
        children = []
        for _ in range(population):
            # queue positions: the queue is in age order, so the lowest position of a rank is its oldest
            # member (a record's index would not do: a re-proposed config re-enters with its old record)
            positions = [int(i) for i in rng.choice(len(queue), size=min(sample, len(queue)), replace=False)]
            ranks = NonDominatedSorting().do(np.array([queue[i].objectives for i in positions], dtype=float),
                                             return_rank=True)[1]
            parent = queue[min(zip(ranks, positions, strict=True))[1]]
            x = enc.encode(parent.config)
            var = int(rng.integers(enc.n_var))
            options = [v for v in range(int(enc.upper[var]) + 1) if v != x[var]]
            if options:
                x[var] = options[int(rng.integers(len(options)))]
            children.append(enc.decode(x))
        before = ctx.count
        new = [r for r in ctx.evaluate_many(children, generation + 1) if r is not None]
        queue = (queue + new)[-population:]
        stalled = 0 if ctx.count > before else stalled + 1


def _take(iterable, n: int) -> list:
    out = []
    for item in iterable:
        if len(out) == n:
            break
        out.append(item)
    return out


def _optuna_strategy(make_sampler: Callable[[int], object]) -> Callable[[SearchContext], None]:
    def run(ctx: SearchContext) -> None:
        _run_optuna(ctx, make_sampler)

    return run


def _run_optuna(ctx: SearchContext, make_sampler: Callable[[int], object]) -> None:
    """Optuna's ask-and-tell, one configuration at a time (Bayesian optimisation is sequential);
    ``population`` asks form one generation. Infeasible configurations are told as failed."""
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    enc, n_obj = ctx.encoding, len(ctx.objectives)
    space = {v.name: IntDistribution(0, len(v.choices) - 1) for v in enc.variables}
    study = optuna.create_study(directions=["minimize"] * n_obj, sampler=make_sampler(ctx.settings.seed))
    asks = stalled = 0
    while not ctx.done() and stalled < MAX_STALLED_GENERATIONS * ctx.settings.population:
        trial = study.ask(space)
        config = enc.decode(np.array([trial.params[v.name] for v in enc.variables]))
        before = ctx.count
        record = ctx.evaluate_many([config], asks // ctx.settings.population + 1)[0]
        asks += 1
        if record is None:
            if ctx.done():
                break
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, list(record.objectives))
        stalled = 0 if ctx.count > before else stalled + 1


def _tpe(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _run_allocator(ctx: SearchContext) -> None:
    from .allocator import run_allocator

    run_allocator(ctx)


def _check_allocator(ctx: SearchContext) -> None:
    from .allocator import check_allocator

    check_allocator(ctx)


def _run_halving(ctx: SearchContext) -> None:
    from .halving import run_halving

    run_halving(ctx)


def _check_halving(ctx: SearchContext) -> None:
    from .halving import check_halving

    check_halving(ctx)


def _check_start(ctx: SearchContext) -> None:
    _feasible_start(ctx, ctx.settings.algorithm)


STRATEGIES: dict[str, Strategy] = {
    "nsga2": Strategy(_pymoo_strategy(_nsga2), True, "NSGA-II (pymoo), integer variables (default)"),
    "nsga3": Strategy(_pymoo_strategy(_nsga3), True, "NSGA-III (pymoo) with Das-Dennis reference directions"),
    "smsemoa": Strategy(_pymoo_strategy(_smsemoa), True, "SMS-EMOA (pymoo), hypervolume-based selection"),
    "spea2": Strategy(_pymoo_strategy(_spea2), True, "SPEA2 (pymoo), strength-Pareto archive"),
    "morea": Strategy(run_morea, True, "multi-objective regularized evolution (one-group mutations, aging queue)"),
    "tpe": Strategy(_optuna_strategy(_tpe), True, "multi-objective TPE (optuna), a Bayesian optimiser"),
    "random": Strategy(run_random, True, "uniform random configurations without repeats"),
    "grid": Strategy(run_grid, False, f"every configuration once (spaces up to {GRID_LIMIT})", check_grid),
    "local": Strategy(run_local, True, "Pareto local search from the midpoint, one step per group", _check_start),
    "midpoint": Strategy(run_midpoint, False, "one evaluation: the heuristic midpoint", _check_start),
    "allocator": Strategy(_run_allocator, False, "marginal-gain rank allocator under a macs/params budget",
                          _check_allocator),
    "halving": Strategy(_run_halving, True, "multi-fidelity successive halving: many configurations on few "
                        "validation examples, the best third promoted to three times as many, within the "
                        "examples NSGA-II would score", _check_halving),
}
