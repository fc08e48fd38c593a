"""``supernet search``: find a trained run's best sub-networks.

Loads the run once (:func:`supernet.loader.load_run`), scores configurations on a fixed subset
of the validation split with :class:`supernet.evaluator.Evaluator`, drives a strategy of
:mod:`supernet.search`, and finally re-evaluates the Pareto set on the whole validation split
and on the test split (reported, never used to select). Under ``torchrun`` / ``accelerate
launch`` the new configurations of each generation are split across the processes and
gathered, so the history equals that of one process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch

from supernet import run as runio
from supernet import validate
from supernet.errors import SupernetError
from supernet.evaluator import Evaluator, default_device
from supernet.files import exclusive, write_atomic
from supernet.search import SearchSettings, run_search
from supernet.search.context import timed_map
from supernet.search.run import LOCK

SEARCH_DIR = "search"


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
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _device(world: int) -> torch.device:
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
                       eval_samples: int = 500, batch_size: int = 64, progress: bool = False) -> dict:
    """Search one trained run; returns a summary (files and the Pareto front) on the main process.

    With ``resume`` and no ``settings``, the search named ``name`` continues with its saved settings.
    """
    rank, world = _distributed()
    record = runio.read_run_config(run_dir)
    runio.weights_path(run_dir)  # a run with no trained weights is refused before anything loads
    if settings is None:
        if not (resume and name):
            raise SupernetError("give --objectives (a new search) or --resume with --name (continue one)")
        settings = saved_settings(search_dir(run_dir, name))
    else:
        validate.number("--eval-samples", eval_samples, low=0, low_open=True, integer=True)
        settings = SearchSettings(**{**_fields(settings), "extra": {"eval_samples": int(eval_samples),
                                                                     "split": "validation",
                                                                     "seq_len": record["train"]["max_length"]}})
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
    from supernet.loader import load_run

    setup, _ = load_run(run_dir)
    samples = int(settings.extra.get("eval_samples", eval_samples))
    device = _device(world)
    evaluator = Evaluator(setup.net, setup.enc, "validation", samples, batch_size, device, setup.cfg.max_length)
    evaluate = evaluator
    if "latency" in settings.objectives:
        def evaluate(config):
            return {**evaluator(config), "latency": evaluator.latency(config)}

    map_fn = sharded_map(rank, world) if world > 1 else None
    _barrier(world)  # every process has checked the folder before the main one writes into it
    if rank == 0:
        result = run_search(setup.net.space, evaluate, evaluator.cost, out_dir, settings, resume, progress, map_fn)
    else:  # the same seeded search, its files in a private folder (the main process writes the real ones)
        scratch = Path(tempfile.mkdtemp(prefix="supernet-search-"))
        try:
            if resume:
                shutil.copytree(out_dir, scratch / "s")
            result = run_search(setup.net.space, evaluate, evaluator.cost, scratch / "s", settings, resume, False,
                                map_fn)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    _barrier(world)
    if rank != 0:
        return {}
    with exclusive(out_dir / LOCK, f"search {out_dir.name!r}"):  # held already (re-entrant)
        front = final_evaluation(setup, result.pareto, batch_size, device, progress)
        write_atomic(out_dir / "pareto.csv", front.to_csv(index=False))
        for row in front.to_dict(orient="records"):
            path = out_dir / "subnets" / f"{int(row['index'])}.json"
            data = validate.read_json("sub-network file", path)
            data["final"] = {k: row[k] for k in FINAL_COLUMNS}
            runio.write_json(path, data)
    return {"search": str(out_dir), "evaluations": len(result.history), "evaluated_now": result.evaluator_calls,
            "pareto": front, "selected": result.selected, "settings": settings.to_json(),
            "eval_examples": evaluator.examples, "processes": world}


FINAL_COLUMNS = ["val_accuracy", "val_loss", "val_examples", "test_accuracy", "test_loss", "test_examples"]


def final_evaluation(setup, pareto: pd.DataFrame, batch_size: int, device, progress: bool) -> pd.DataFrame:
    """The Pareto set on the whole validation split and on the test split."""
    from tqdm.auto import tqdm

    evaluators = {split: Evaluator(setup.net, setup.enc, split, None, batch_size, device, setup.cfg.max_length)
                  for split in ("validation", "test")}
    rows = []
    for config in tqdm(pareto["config"], desc="final evaluation", disable=not progress, leave=False):
        row = {}
        for short, split in (("val", "validation"), ("test", "test")):
            m = evaluators[split](json.loads(config))
            row |= {f"{short}_accuracy": m["accuracy"], f"{short}_loss": m["loss"],
                    f"{short}_examples": evaluators[split].examples}
        rows.append(row)
    return pd.concat([pareto.reset_index(drop=True), pd.DataFrame(rows, columns=FINAL_COLUMNS)], axis=1)


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
