"""``supernet.search``: search over a trained super-network's configurations.

Installed as ``supernet.search`` (``package-dir`` in ``pyproject.toml``), never as a
top-level ``search`` module. The strategies (NSGA-II through pymoo, the heuristic midpoint,
the marginal-gain rank allocator) land here; today the space's ``mid_config`` is the
midpoint and ``supernet eval`` scores any configuration.
"""
