"""``supernet search``: find a trained run's best sub-networks, and print its Pareto front.

Loads the run once (:func:`supernet.loader.load_run`), scores configurations on a fixed subset
of the validation split with :class:`supernet.evaluator.Evaluator`, drives a strategy of
:mod:`supernet.search`, and finally re-evaluates the Pareto set on the whole validation split
and on the test split (reported, never used to select). Under ``torchrun`` / ``accelerate
launch`` the new configurations of each generation are split across the processes and
gathered, so the history equals that of one process.

The defaults of the settings are :class:`supernet.search.SearchSettings`'s (the one source the
``--help`` text and the README are checked against), and ``EVAL_SAMPLES`` here. torch, pandas
and the model code are imported when the command runs, so the parser can read these cheaply.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from supernet import runfiles, validate
from supernet.errors import SupernetError
from supernet.files import exclusive, write_atomic
from supernet.search import SearchSettings, run_search
from supernet.search.context import timed_map
from supernet.search.objectives import PROXY_METRICS
from supernet.search.run import LOCK

if TYPE_CHECKING:
    import pandas as pd
    import torch

SEARCH_DIR = "search"
#: validation examples that score one configuration (``--eval-samples``)
EVAL_SAMPLES = 500
#: the settings given as flags; ``--resume`` refuses them (it continues with the saved ones)
SETTINGS = ("objectives", "algorithm", "population", "evaluations", "seed", "constraint", "budget", "eval_samples",
            "final_samples")


def run(args: argparse.Namespace) -> int:
    """``supernet search``: search, then print the front (stderr) and a JSON summary line (stdout)."""
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    if args.batch_size <= 0:
        raise SupernetError("--batch-size must be positive")
    if args.name is not None:
        validate.run_name(args.name)
    if args.resume:
        if given:
            raise SupernetError("--resume continues a search with its saved settings; give only --run and --name")
        if args.name is None:
            raise SupernetError("--resume needs the --name of the search to continue")
        settings, samples, final = None, EVAL_SAMPLES, None
    else:
        samples = given.pop("eval_samples", EVAL_SAMPLES)
        final = given.pop("final_samples", None)
        settings = SearchSettings(**given)  # what is not given: SearchSettings's defaults
    out = run_search_command(args.run, settings, args.name, args.resume, samples, args.batch_size,
                             progress=sys.stderr.isatty(), final_samples=final)
    if out:  # the main process
        print_front(out)
    return 0


def print_front(out: dict) -> None:
    """The front (accuracy in %) and the files written on stderr; one JSON summary line on stdout."""
    front = out["pareto"]
    objectives = out["settings"]["objectives"]
    show = ["index", "accuracy", "val_accuracy", "test_accuracy", "macs", "params"]
    show += [m for m in ("loss", "latency") if m in front.columns and m in objectives]
    table = front[[c for c in show if c in front.columns]].copy()
    for c in ("accuracy", "val_accuracy", "test_accuracy"):
        if c in table:
            table[c] = (100 * table[c]).map("{:.2f}".format)
    for c in ("macs", "params"):
        if c in table:
            table[c] = table[c].map("{:.4g}".format)
    print(f"Pareto front ({len(front)} of {out['evaluations']} evaluated; accuracy on {out['eval_examples']} "
          "validation examples, val_/test_ on the whole splits or --final-samples):", file=sys.stderr)
    print(table.to_string(index=False), file=sys.stderr)
    noise = {c: 50 * (front[f"{c}_high"] - front[f"{c}_low"]).mean() for c in ("accuracy", "val_accuracy")
             if f"{c}_high" in front.columns}
    if noise:
        print("95% intervals (Wilson): " + ", ".join(f"{c} +/- {v:.1f} points" for c, v in noise.items())
              + "; a difference smaller than that is evaluation noise, not a ranking", file=sys.stderr)
    c = out.get("confirmation")
    if c:
        print(f"confirmed on the final examples: {c['rescored']} configurations re-scored (the front and those it "
              f"beats within the noise); demoted {c['demoted'] or 'none'}, promoted {c['promoted'] or 'none'} "
              "(rescored.csv)", file=sys.stderr)
    if out["selected"]:
        print(f"allocator's choice: evaluation {out['selected'].get('index')}", file=sys.stderr)
    print(f"files: {out['search']}/{{search.json, history.csv, pareto.csv, subnets/}}", file=sys.stderr)
    print(json.dumps({"search": out["search"], "evaluations": out["evaluations"],
                      "evaluated_now": out["evaluated_now"], "pareto_size": len(front), "processes": out["processes"],
                      "selected": out["selected"], "confirmation": out.get("confirmation")}))


def default_name(settings: SearchSettings) -> str:
    """``nsga2-acc-macs-s0``; the allocator adds its budget: ``allocator-macs7.6e+08``."""
    if settings.algorithm == "allocator" and settings.budget is not None:
        return f"allocator-{settings.budget[0]}{settings.budget[1]:.3g}"
    return f"{settings.algorithm}-{'-'.join(settings.objectives)}-s{settings.seed}"


def search_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / SEARCH_DIR / validate.run_name(name)


def saved_settings(out_dir: Path) -> SearchSettings:
    """The settings a search was started with (for ``--resume`` with ``--run`` and ``--name`` alone)."""
    path = out_dir / "search.json"
    if not path.is_file():
        raise SupernetError(f"no search to resume at {str(out_dir)!r} (no search.json)")
    data = validate.read_json("search file", path)
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise SupernetError(f"search file {str(path)!r} is corrupt")
    return SearchSettings.from_json(data["settings"])


# ----------------------------------------------------------------------------- processes
def _distributed() -> tuple[int, int]:
    """``(rank, world)``; initialises torch.distributed when launched with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _device(world: int) -> torch.device:
    import torch

    from supernet.evaluator import default_device

    if world > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return default_device()


def sharded_map(rank: int, world: int):
    """A ``map_fn`` for :func:`run_search`: process ``r`` evaluates configs ``r, r + world, ...``
    of a generation; every process receives every result, in order."""
    import torch.distributed as dist

    def map_fn(evaluate, configs):
        mine = [(i, *result) for i, result in zip(range(rank, len(configs), world),
                                                   timed_map(evaluate, configs[rank::world]), strict=True)]
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        found = {i: (raw, seconds) for part in parts for i, raw, seconds in part}
        for i in range(len(configs)):
            yield found[i]

    return map_fn


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- the command
def run_search_command(run_dir: str | Path, settings: SearchSettings | None, name: str | None, resume: bool,
                       eval_samples: int = EVAL_SAMPLES, batch_size: int = 64, progress: bool = False,
                       final_samples: int | None = None) -> dict:
    """Search one trained run; returns a summary (files and the Pareto front) on the main process.

    With ``resume`` and no ``settings``, the search named ``name`` continues with its saved settings.
    ``final_samples``: the first examples of the validation and test splits that re-score the front
    at the end (default: the whole splits), saved with the settings.
    """
    rank, world = _distributed()
    record = runfiles.read_run_config(run_dir)
    runfiles.weights_path(run_dir)  # a run with no trained weights is refused before anything loads
    if settings is None:
        if not (resume and name):
            raise SupernetError("give --objectives (a new search) or --resume with --name (continue one)")
        settings = saved_settings(search_dir(run_dir, name))
    else:
        validate.number("--eval-samples", eval_samples, low=0, low_open=True, integer=True)
        extra = {"eval_samples": int(eval_samples), "split": "validation", "seq_len": record["train"]["max_length"]}
        if final_samples is not None:  # absent otherwise, so that older searches' settings compare equal
            validate.number("--final-samples", final_samples, low=0, low_open=True, integer=True)
            extra["final_samples"] = int(final_samples)
        extra["confirm"] = True  # the front confirmed on whole splits (supernet.front); older searches lack it
        settings = SearchSettings(**{**_fields(settings), "extra": extra})
    out_dir = search_dir(run_dir, name or default_name(settings))
    _precheck(out_dir, settings, resume)
    if rank != 0:
        return _search_run(run_dir, settings, out_dir, resume, eval_samples, batch_size, progress, rank, world)
    # One writer per search, from before the model loads to the last file of the final evaluation:
    # a second search or resume of this name is refused at once.
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir / LOCK, f"search {out_dir.name!r}"):
        try:
            return _search_run(run_dir, settings, out_dir, resume, eval_samples, batch_size, progress, rank, world)
        finally:
            if created and not (out_dir / "search.json").is_file():  # a new search that wrote nothing
                (out_dir / LOCK).unlink(missing_ok=True)
                if not any(out_dir.iterdir()):
                    out_dir.rmdir()


def _search_run(run_dir, settings: SearchSettings, out_dir: Path, resume: bool, eval_samples: int, batch_size: int,
                progress: bool, rank: int, world: int) -> dict:
    from supernet.evaluator import Evaluator
    from supernet.loader import load_run

    setup, _ = load_run(run_dir)
    samples = int(settings.extra.get("eval_samples", eval_samples))
    device = _device(world)
    evaluator = Evaluator(setup.net, setup.enc, "validation", samples, batch_size, device, setup.cfg.max_length)
    wanted = [m for m in settings.objectives if m in PROXY_METRICS]
    batch = proxy_batch(setup, device) if wanted else None  # zero-cost proxies: the run's first training batch

    def extras(config) -> dict:
        out = {"latency": evaluator.latency(config)} if "latency" in settings.objectives else {}
        if wanted:
            from supernet.fidelity import proxies

            found = proxies(setup.net, batch, config)
            out |= {m: found[PROXY_METRICS[m]] for m in wanted}
        return out

    def evaluate(config):
        return {**evaluator(config), **extras(config)}

    fidelities = {samples: evaluator}

    def evaluate_at(config, examples: int):  # the lower fidelities of a multi-fidelity strategy
        if examples not in fidelities:
            fidelities[examples] = Evaluator(setup.net, setup.enc, "validation", examples, batch_size, device,
                                             setup.cfg.max_length)
        return {**fidelities[examples](config), **extras(config)}

    map_fn = sharded_map(rank, world) if world > 1 else None
    _barrier(world)  # every process has checked the folder before the main one writes into it
    if rank == 0:
        result = run_search(setup.net.space, evaluate, evaluator.cost, out_dir, settings, resume, progress, map_fn,
                            evaluate_at, samples)
    else:  # the same seeded search, its files in a private folder (the main process writes the real ones)
        scratch = Path(tempfile.mkdtemp(prefix="supernet-search-"))
        try:
            if resume:
                shutil.copytree(out_dir, scratch / "s")
            result = run_search(setup.net.space, evaluate, evaluator.cost, scratch / "s", settings, resume, False,
                                map_fn, evaluate_at, samples)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    _barrier(world)
    if rank != 0:
        return {}
    with exclusive(out_dir / LOCK, f"search {out_dir.name!r}"):  # held already (re-entrant)
        front, confirmation = _final_front(setup, settings, result, evaluator.examples, batch_size, device, progress,
                                           out_dir)
    return {"search": str(out_dir), "evaluations": len(result.history), "evaluated_now": result.evaluator_calls,
            "pareto": front, "selected": result.selected, "settings": settings.to_json(),
            "eval_examples": evaluator.examples, "processes": world, "confirmation": confirmation}


def proxy_batch(setup, device) -> dict:
    """The first ``--batch-size`` examples of the run's training split, labels included: the batch
    every zero-cost proxy is computed on."""
    from supernet.tasks import collate, rows_of

    train = setup.enc.splits["train"]
    batch = collate(setup.enc, rows_of(train, range(min(setup.cfg.batch_size, len(train)))))
    return {k: v.to(device) for k, v in batch.items()}


def _final_front(setup, settings: SearchSettings, result, examples: int, batch_size: int, device, progress: bool,
                 out_dir: Path) -> tuple[pd.DataFrame, dict | None]:
    """Score the front on whole splits; a search started with ``confirm`` first re-scores the
    configurations its members beat within the noise and takes the front of all of them
    (:mod:`supernet.front`, ``rescored.csv``). Writes pareto.csv and the members' subnets/ files."""
    import pandas as pd

    from supernet.front import FINAL_COLUMNS, candidates, confirm, final_evaluation, with_search_interval

    samples = settings.extra.get("final_samples")
    history = with_search_interval(result.history, examples)
    members = [int(i) for i in result.pareto["index"]]
    confirmation = None
    if settings.extra.get("confirm") and "accuracy" in history.columns:
        columns = [f"obj_{o}" for o in settings.objectives]
        picked = candidates(history, members, columns)
        scored = confirm(final_evaluation(setup, history[history["index"].isin(picked)], batch_size, device,
                                          progress, samples, ("val",)), settings.objectives, members)
        write_atomic(out_dir / "rescored.csv", scored.to_csv(index=False))
        front = scored[scored["status"].isin(["kept", "promoted"])].drop(columns="status")
        front = front.sort_values([*columns, "index"]).reset_index(drop=True)
        test = final_evaluation(setup, front[["config"]], batch_size, device, progress, samples, ("test",))
        front = pd.concat([front, test.drop(columns="config")], axis=1)[[*front.columns, *test.columns[1:]]]
        front = front[[c for c in front.columns if c not in FINAL_COLUMNS] + FINAL_COLUMNS]
        confirmation = {"rescored": len(scored), **{k: [int(i) for i in scored.loc[scored["status"] == k, "index"]]
                                                    for k in ("demoted", "promoted")}}
    else:
        front = with_search_interval(final_evaluation(setup, result.pareto, batch_size, device, progress, samples),
                                     examples)
    write_atomic(out_dir / "pareto.csv", front.to_csv(index=False))
    subnets = out_dir / "subnets"
    for i in (confirmation or {}).get("demoted", []):
        (subnets / f"{i}.json").unlink(missing_ok=True)  # written by this search, no longer a member
    metrics = [c for c in history.columns if c not in ("index", "generation", "config", "seconds", "accuracy_low",
                                                       "accuracy_high") and not c.startswith("obj_")]
    for row in front.to_dict(orient="records"):
        path = subnets / f"{int(row['index'])}.json"
        data = validate.read_json("sub-network file", path) if path.is_file() else {
            "index": int(row["index"]), "config": json.loads(row["config"]),
            "metrics": {m: row[m] for m in metrics},
            "objectives": {o: row[f"obj_{o}"] for o in settings.objectives}}
        data["final"] = {k: row[k] for k in FINAL_COLUMNS}
        runfiles.write_json(path, data)
    return front, confirmation


def _fields(settings: SearchSettings) -> dict:
    return {k: getattr(settings, k) for k in ("objectives", "algorithm", "population", "evaluations", "seed",
                                              "constraint", "budget")}


def _precheck(out_dir: Path, settings: SearchSettings, resume: bool) -> None:
    """The folder checks of run_search, before the model is loaded (fast failure)."""
    path = out_dir / "search.json"
    if resume and not path.is_file():
        raise SupernetError(f"no search to resume at {str(out_dir)!r} (no search.json)")
    if not resume and out_dir.exists() and any(p.name != LOCK for p in out_dir.iterdir()):
        if path.is_file():
            old = saved_settings(out_dir)
            if old.to_json() != settings.to_json():
                raise SupernetError(f"search {out_dir.name!r} exists with different settings; choose another --name")
            raise SupernetError(f"search {out_dir.name!r} exists; continue it with --resume")
        raise SupernetError(f"{str(out_dir)!r} exists and is not a search; choose another --name")
    validate.writable_dir("--run", out_dir.parent)
