"""How far to trust a super-network's ranking of its sub-networks.

- :func:`pick_configs`: the configurations a fidelity study trains stand-alone: ``max``, ``min``
  and ``mid``, then a spread over MACs (a seeded pool of uniform samples cut into equal-MACs
  strata, one configuration from each);
- :func:`rank_agreement`: Kendall's tau and Spearman's rho between two scorings of the same
  configurations (:mod:`scipy.stats`), each with a seeded percentile-bootstrap interval over the
  configurations;
- :func:`accuracy_interval`: the Wilson score interval of an accuracy measured on ``n`` examples,
  the evaluation noise a difference between two configurations has to exceed;
- :func:`proxies`: zero-cost proxies of a configuration from one batch, no training: the gradient
  norm of the active adapter parameters, SNIP saliency (``sum |w * dL/dw|`` over them) and the loss.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from supernet.space import Config

if TYPE_CHECKING:
    import torch

    from supernet.network import SuperNetwork

#: confidence level of every interval reported here
LEVEL = 0.95
#: pool of uniform samples per stratum from which :func:`pick_configs` draws
POOL_PER_CONFIG = 32


def _key(config: Mapping[str, object]) -> str:
    return json.dumps(config, sort_keys=True)


def pick_configs(net: SuperNetwork, n: int, seed: int, seq_len: int) -> list[tuple[str, Config]]:
    """``n`` distinct configurations labelled ``max``, ``min``, ``mid`` and ``spread-<i>``.

    The spread: ``POOL_PER_CONFIG * n`` seeded uniform samples, sorted by MACs and cut into
    ``n - 3`` strata of equal MACs range; from each, the sample nearest its middle that is not
    chosen yet. A space with fewer than ``n`` configurations gives all it has."""
    named = [("max", net.max_config()), ("min", net.min_config()), ("mid", net.mid_config())]
    chosen: dict[str, tuple[str, Config]] = {}
    for label, config in named[:n]:
        chosen.setdefault(_key(config), (label, config))
    rng = np.random.default_rng(seed)
    pool = {}
    for _ in range(POOL_PER_CONFIG * max(n, 1)):
        config = net.sample(rng)
        pool.setdefault(_key(config), config)
    pool = {k: c for k, c in pool.items() if k not in chosen}
    macs = {k: net.macs(c, seq_len) for k, c in pool.items()}
    if pool and len(chosen) < n:
        low, high = min(macs.values()), max(macs.values())
        strata = n - len(chosen)
        for i in range(strata):
            if not pool:
                break
            target = low + (high - low) * (i + 0.5) / strata
            k = min(pool, key=lambda k: (abs(macs[k] - target), k))
            chosen[k] = (f"spread-{i}", pool.pop(k))
    return list(chosen.values())


def rank_agreement(x: Sequence[float], y: Sequence[float], resamples: int = 1000, seed: int = 0) -> dict:
    """Kendall's tau (tau-b) and Spearman's rho of ``x`` against ``y``, with percentile-bootstrap
    intervals (``resamples`` resamplings of the pairs, seeded; a resample whose coefficient is
    undefined, e.g. all ties, is skipped)."""
    from scipy.stats import kendalltau, spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("two equally long sequences of scores are needed")
    out = {"n": int(len(x)), "level": LEVEL, "resamples": resamples}
    stats = {"kendall_tau": lambda a, b: kendalltau(a, b).statistic,
             "spearman_rho": lambda a, b: spearmanr(a, b).statistic}
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(x), len(x)) for _ in range(resamples)] if len(x) > 1 else []
    for name, f in stats.items():
        with warnings.catch_warnings():  # a resample of tied values has no coefficient: skipped below
            warnings.simplefilter("ignore")
            value = float(f(x, y)) if len(x) > 1 else math.nan
            boot = [float(f(x[i], y[i])) for i in draws]
        boot = [b for b in boot if math.isfinite(b)]
        low, high = (np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]) if boot else (math.nan, math.nan))
        out |= {name: value, f"{name}_low": float(low), f"{name}_high": float(high)}
    return out


def accuracy_interval(accuracy: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``accuracy`` measured on ``n`` examples."""
    from scipy.stats import norm

    if n <= 0:
        return (math.nan, math.nan)
    z = float(norm.ppf((1 + level) / 2))
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


PROXIES = ("grad_norm", "snip", "loss")


def proxies(net: SuperNetwork, batch: Mapping[str, torch.Tensor], config: Mapping[str, object]) -> dict:
    """The zero-cost proxies of ``config`` on one labelled ``batch`` (eval mode: no dropout, so
    deterministic), and the seconds they took. Gradients of the adapters' parameters at ``config``
    (an inactive rank slice or cut row gets none, so it adds nothing); the model's gradients are
    cleared before and after."""
    adapters = [p for a in net.adapters.values() for p in a.parameters() if p.requires_grad]
    model = net.model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    net.activate(config)
    model.zero_grad(set_to_none=True)
    try:
        loss = model(**batch).loss
        loss.backward()
        grads = [(p, p.grad) for p in adapters if p.grad is not None]
        grad_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for _, g in grads))
        snip = sum(float((p.detach() * g).abs().double().sum()) for p, g in grads)
        out = {"grad_norm": grad_norm, "snip": snip, "loss": float(loss.detach())}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    out["seconds"] = time.perf_counter() - start
    return out
