"""``supernet fidelity``: does the super-network rank its sub-networks as they rank trained alone?

For ``--configs N`` configurations (:func:`supernet.fidelity.pick_configs`), each is trained
stand-alone: a new run with the same options, data, steps and seed, through the same trainer,
that trains that one configuration every step (``TrainConfig.fixed``). The super-network's and
the stand-alone networks' accuracies on the validation split (with Wilson intervals), the
zero-cost proxies of each configuration on one training batch, and Kendall's tau and Spearman's
rho of the super-network and of each proxy against the stand-alone accuracy (bootstrap
intervals) are written to ``RUN/fidelity/NAME/``: ``fidelity.csv``, ``fidelity.json``,
``fidelity.png`` (a scatter plot), ``configs.json`` and ``standalone/<i>/`` (the runs).

Resumable: the configurations are fixed by ``configs.json``; a stand-alone run that finished is
not trained again, one that stopped resumes from its checkpoint, and ``fidelity.csv`` rows
already written are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import pandas as pd

from supernet import files, runfiles, validate
from supernet.commands.search import proxy_batch
from supernet.errors import SupernetError
from supernet.fidelity import PROXIES, accuracy_interval, pick_configs, proxies, rank_agreement

FIDELITY_DIR = "fidelity"
SETTINGS_FILE = "configs.json"
ROWS = "fidelity.csv"


def run(args: argparse.Namespace) -> int:
    out = fidelity_command(args.run, args.configs, args.seed, args.eval_samples, args.name, args.batch_size)
    s = out["summary"]
    print(f"Kendall tau {s['kendall_tau']:.3f} [{s['kendall_tau_low']:.3f}, {s['kendall_tau_high']:.3f}], "
          f"Spearman rho {s['spearman_rho']:.3f} [{s['spearman_rho_low']:.3f}, {s['spearman_rho_high']:.3f}] over "
          f"{s['n']} configurations; files in {out['dir']}", file=sys.stderr)
    print(json.dumps(validate.jsonable(out)))
    return 0


def _settings(n: int, seed: int, eval_samples: int | None) -> dict:
    return {"configs": n, "seed": seed, "eval_samples": eval_samples}


def fidelity_command(run_dir: str | Path, n: int = 10, seed: int = 0, eval_samples: int | None = None,
                     name: str | None = None, batch_size: int = 64) -> dict:
    """Train ``n`` configurations of a run stand-alone and compare rankings; returns the summary."""
    from supernet.evaluator import Evaluator, default_device
    from supernet.loader import config_of_run, load_run

    run_dir = Path(run_dir)
    validate.number("--configs", n, low=3, integer=True)
    validate.seed("--seed", seed)
    if eval_samples is not None:
        validate.number("--eval-samples", eval_samples, low=0, low_open=True, integer=True)
    validate.number("--batch-size", batch_size, low=0, low_open=True, integer=True)
    name = validate.run_name(name or f"n{n}-s{seed}")
    record = runfiles.read_run_config(run_dir)
    runfiles.weights_path(run_dir)
    cfg = config_of_run(record)
    if cfg.fixed is not None:
        raise SupernetError(f"run {str(run_dir)!r} trained one fixed configuration, not a super-network")
    out = run_dir / FIDELITY_DIR / name
    settings = _settings(n, seed, eval_samples)
    setup, _ = load_run(run_dir)
    if (out / SETTINGS_FILE).is_file():
        saved = validate.read_json("fidelity settings", out / SETTINGS_FILE)
        if saved.get("settings") != settings:
            raise SupernetError(f"fidelity study {name!r} exists with other settings; choose another --name")
        chosen = [(c["label"], setup.net.space.validate(c["config"])) for c in saved["configs"]]
    else:
        if out.exists() and any(out.iterdir()):
            raise SupernetError(f"{str(out)!r} exists and is not a fidelity study; choose another --name")
        chosen = pick_configs(setup.net, n, seed, cfg.max_length)
        out.mkdir(parents=True, exist_ok=True)
        runfiles.write_json(out / SETTINGS_FILE, {"settings": settings, "configs": [
            {"label": label, "config": config} for label, config in chosen]})
    device = default_device()
    with files.exclusive(out / ".lock", f"fidelity study {name!r}"):
        rows = _rows(out)
        batch = proxy_batch(setup, device)
        evaluator = Evaluator(setup.net, setup.enc, "validation", eval_samples, batch_size, device, cfg.max_length)
        todo = [(i, label, config) for i, (label, config) in enumerate(chosen) if i not in set(rows["index"])]
        for i, label, config in todo:
            row = {"index": i, "label": label, "config": json.dumps(config, sort_keys=True),
                   "macs": setup.net.macs(config, cfg.max_length)}
            row |= _scored("supernet", evaluator(config), evaluator.examples)
            row |= {f"proxy_{k}": v for k, v in proxies(setup.net, batch, config).items()}
            standalone = _train_standalone(cfg, config, out / "standalone", i)
            alone, _ = load_run(standalone)
            ev = Evaluator(alone.net, alone.enc, "validation", eval_samples, batch_size, device, cfg.max_length)
            row |= _scored("standalone", ev(config), ev.examples)
            del alone, ev
            files.write_atomic(out / ROWS, pd.concat([rows, pd.DataFrame([row])]).to_csv(index=False))
            rows = _rows(out)
        summary = _summary(rows, seed)
        runfiles.write_json(out / "fidelity.json", {"settings": settings, **summary})
        _plot(rows, summary, out / "fidelity.png")
    return {"dir": str(out), "summary": summary["supernet"], "proxies": summary["proxies"],
            "configs": len(rows)}


def _rows(out: Path) -> pd.DataFrame:
    path = out / ROWS
    if not path.is_file():
        return pd.DataFrame(columns=["index"])
    try:
        return pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise SupernetError(f"{str(path)!r} is corrupt: {e}") from None


def _scored(prefix: str, res: dict, n: int) -> dict:
    low, high = accuracy_interval(res["accuracy"], n)
    return {f"{prefix}_accuracy": res["accuracy"], f"{prefix}_low": low, f"{prefix}_high": high,
            f"{prefix}_loss": res["loss"], f"{prefix}_examples": n}


def _train_standalone(cfg, config: dict, root: Path, i: int) -> Path:
    """Train ``config`` alone (or resume it), with the run's options; returns its folder."""
    from supernet.train import resume, train

    d = root / str(i)
    if (d / runfiles.ADAPTER).is_file():
        return d  # finished
    # the same options, data, steps and seed; one configuration every step, so no sampler and no teacher
    alone = dataclasses.replace(cfg, fixed=config, sampler="uniform", distill="none", name=str(i), out=str(root))
    if (d / runfiles.CHECKPOINT).exists():
        resume(d)
    else:
        train(alone, overwrite=d.exists())
    return d


def _summary(rows: pd.DataFrame, seed: int) -> dict:
    truth = rows["standalone_accuracy"].to_numpy(float)
    out = {"supernet": rank_agreement(rows["supernet_accuracy"].to_numpy(float), truth, seed=seed), "proxies": {}}
    for p in PROXIES:
        values = rows[f"proxy_{p}"].to_numpy(float)
        sign = 1.0 if p != "loss" else -1.0  # a lower loss predicts a higher accuracy
        out["proxies"][p] = {**rank_agreement(sign * values, truth, seed=seed),
                             "seconds_per_config": float(rows["proxy_seconds"].mean())}
    width = (rows["supernet_high"] - rows["supernet_low"]).mean()
    spread = rows["standalone_accuracy"].max() - rows["standalone_accuracy"].min()
    out["noise"] = {"mean_interval_width": float(width), "standalone_spread": float(spread),
                    "ranking_within_noise": bool(spread <= width) if math.isfinite(width) else None}
    return out


def _plot(rows: pd.DataFrame, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    x, y = 100 * rows["standalone_accuracy"], 100 * rows["supernet_accuracy"]
    ax.errorbar(x, y, yerr=[y - 100 * rows["supernet_low"], 100 * rows["supernet_high"] - y],
                xerr=[x - 100 * rows["standalone_low"], 100 * rows["standalone_high"] - x], fmt="o", ms=4,
                alpha=0.8, elinewidth=0.6)
    for label, a, b in zip(rows["label"], x, y, strict=True):
        if not str(label).startswith("spread"):
            ax.annotate(label, (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    s = summary["supernet"]
    ax.set_title(f"Kendall tau {s['kendall_tau']:.2f} [{s['kendall_tau_low']:.2f}, {s['kendall_tau_high']:.2f}]")
    ax.set_xlabel("stand-alone validation accuracy (%)")
    ax.set_ylabel("super-network validation accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
