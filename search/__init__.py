"""``supernet.search``: search over a trained super-network's configurations.

Installed as ``supernet.search`` (``package-dir`` in ``pyproject.toml``), never as a
top-level ``search`` module. Independent of models and of training code (importing it loads
neither torch nor transformers): a search takes a :class:`~supernet.space.SearchSpace`, an
evaluator ``config -> raw metrics`` and a cheap cost function ``config -> {macs, params}``, and
writes search.json, history.csv, pareto.csv and subnets/ through :func:`run_search`.

Modules: ``encoding`` (integer variables, constraints), ``objectives``, ``strategies``,
``settings`` (:class:`SearchSettings`, whose defaults are the command's), ``history`` (the
cached, resumable history file), ``context`` (what a strategy sees), ``pareto`` (front,
hypervolume), ``allocator``, ``halving`` and ``run`` (:func:`run_search`).

Strategies (``STRATEGIES``): ``nsga2`` (default), ``nsga3``, ``smsemoa``, ``spea2`` (pymoo),
``morea`` (multi-objective regularized evolution), ``tpe`` (optuna's multi-objective TPE),
``random``, ``grid``, ``local`` (Pareto local search), ``midpoint``, ``allocator``
(marginal-gain rank allocator) and ``halving`` (multi-fidelity successive halving).

Objectives (``OBJECTIVES``, each minimised internally): ``acc``, ``loss``, ``macs``, ``params``,
``latency`` and ``size``, and the zero-cost proxies ``grad_norm``, ``snip`` and ``batch_loss``.
"""

from .allocator import allocator_evaluations, greedy_allocation
from .encoding import Constraint, Encoding, Variable, parse_constraint
from .objectives import OBJECTIVES, Objective, resolve_objectives
from .pareto import HV_REFERENCE, hypervolume, hypervolume_curve, non_dominated, pareto_front
from .run import SearchResult, run_search
from .settings import SearchSettings, parse_budget
from .strategies import GRID_LIMIT, STRATEGIES, Strategy

__all__ = [
    "GRID_LIMIT", "HV_REFERENCE", "OBJECTIVES", "STRATEGIES", "Constraint", "Encoding", "Objective", "SearchResult",
    "SearchSettings", "Strategy", "Variable", "allocator_evaluations", "greedy_allocation", "hypervolume",
    "hypervolume_curve", "non_dominated", "parse_budget", "parse_constraint", "pareto_front", "resolve_objectives",
    "run_search",
]
