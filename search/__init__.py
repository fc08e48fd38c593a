"""``supernet.search``: search over a trained super-network's configurations.

Installed as ``supernet.search`` (``package-dir`` in ``pyproject.toml``), never as a
top-level ``search`` module. Independent of models and of training code: a search takes a
:class:`~supernet.space.SearchSpace`, an evaluator ``config -> raw metrics`` and a cheap cost
function ``config -> {macs, params}``, and writes search.json, history.csv, pareto.csv and
subnets/ through :func:`run_search`.

Strategies (``STRATEGIES``): nsga2 (default), nsga3, smsemoa, spea2 (pymoo), random, grid,
local (Pareto local search), midpoint and allocator (marginal-gain rank allocator).
"""

from .allocator import allocator_evaluations, greedy_allocation
from .objectives import OBJECTIVES, Objective, resolve_objectives
from .pareto import HV_REFERENCE, hypervolume, hypervolume_curve, non_dominated, pareto_front
from .run import SearchResult, run_search
from .settings import SearchSettings, parse_budget
from .space import Constraint, Encoding, Variable, parse_constraint
from .strategies import GRID_LIMIT, STRATEGIES, Strategy

__all__ = [
    "GRID_LIMIT", "HV_REFERENCE", "OBJECTIVES", "STRATEGIES", "Constraint", "Encoding", "Objective", "SearchResult",
    "SearchSettings", "Strategy", "Variable", "allocator_evaluations", "greedy_allocation", "hypervolume",
    "hypervolume_curve", "non_dominated", "parse_budget", "parse_constraint", "pareto_front", "resolve_objectives",
    "run_search",
]
