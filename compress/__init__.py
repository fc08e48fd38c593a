"""``supernet.compress``: compressed frozen bases (Wanda / N:M sparsity, group-wise INT4/INT8)
and extraction of deployable models.

Installed as ``supernet.compress`` (``package-dir`` in ``pyproject.toml``), never as a
top-level ``compress`` module. Empty until those issues land.
"""
