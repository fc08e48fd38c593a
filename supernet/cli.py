"""``supernet`` command line: one subcommand per stage, each ``setup -> run -> save``.

Errors a user can cause end as one line on stderr (``supernet: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from supernet import plots, validate
from supernet.errors import SupernetError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        raise SupernetError(f"{self.prog}: {message}")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, not the user's
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


TRAIN_FLAGS: list[tuple[str, dict]] = [
    ("model", {"help": "built-in name (minilm, smollm2), local folder or Hub id [minilm]"}),
    ("dataset", {"help": "built-in (rotten-tomatoes, sms-spam), CSV/JSON/parquet path or Hub id [rotten-tomatoes]"}),
    ("task", {"choices": ["seq-cls", "causal-lm"], "help": "default: causal-lm for *ForCausalLM checkpoints"}),
    ("text-column", {"help": "[text]"}),
    ("label-column", {"help": "[label]"}),
    ("prompt", {"help": "causal-LM prompt containing {text}"}),
    ("choices-column", {"help": "multiple choice: column of answer lists; the label is an index or the answer"}),
    ("target-modules", {"type": _csv, "help": "comma-separated name patterns (re:<regex> allowed)"}),
    ("ranks", {"help": "rank choices, e.g. 32,24,16"}),
    ("alpha", {"type": float, "help": "LoRA alpha [32]"}),
    ("scaling", {"choices": ["fixed", "lora", "rora"], "help": "alpha/r_max, alpha/r or alpha/sqrt(r) [lora]"}),
    ("dropout", {"type": float}),
    ("groups", {"help": "block, module, global or a JSON file {group: [patterns]} [block]"}),
    ("sampler", {"choices": ["uniform", "sandwich"], "help": "[uniform]"}),
    ("sandwich-random", {"type": int, "help": "random configs per sandwich step [2]"}),
    ("max-steps", {"type": int}),
    ("batch-size", {"type": int}),
    ("grad-accum", {"type": int}),
    ("lr", {"type": float}),
    ("weight-decay", {"type": float}),
    ("warmup-ratio", {"type": float}),
    ("max-grad-norm", {"type": float}),
    ("max-length", {"type": int}),
    ("train-samples", {"type": int}),
    ("eval-samples", {"type": int}),
    ("eval-every", {"type": int}),
    ("save-every", {"type": int}),
    ("seed", {"type": int}),
    ("sparsity", {"type": float, "help": "prune this fraction of each row of the frozen base [0]"}),
    ("prune", {"choices": ["wanda", "magnitude"], "help": "pruning score [wanda]"}),
    ("pattern", {"help": "unstructured, 2:4 or 4:8 (N of every M inputs kept) [unstructured]"}),
    ("bits", {"type": int, "help": "quantise the frozen base to 4 or 8 bits (asymmetric, group-wise)"}),
    ("group-size", {"type": int, "help": "input columns per quantisation scale [64]"}),
    ("adapter-merge", {"choices": ["plain", "sparse", "qa-sparse"],
                       "help": "plain LoRA, SparsePEFT (update masked) or QA-SparsePEFT (trained through "
                               "the quantiser) [plain]"}),
    ("calibration-samples", {"type": int, "help": "training sequences for Wanda's statistics [128]"}),
    ("mixed-precision", {"choices": ["auto", "no", "bf16"]}),
    ("name", {"help": "run name: the run goes to OUT/NAME [MODEL-DATASET]"}),
    ("out", {"help": "folder of runs [runs]"}),
]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="supernet", description="Weight-sharing super-networks of low-rank adapters.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a super-network (NLS: one sub-adapter per step)")
    t.add_argument("--config", help="YAML or JSON file of training options (flags override it)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    for flag, kw in TRAIN_FLAGS:
        t.add_argument(f"--{flag}", default=argparse.SUPPRESS, **kw)

    e = sub.add_parser("eval", help="evaluate one sub-network of a run; prints one JSON line")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--subnet", default="max", help="max, mid, min or a JSON file {group: rank}")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--predictions", help="write per-example predictions and logits to this CSV")
    e.add_argument("--limit", type=int, help="evaluate only the first N examples")
    e.add_argument("--batch-size", type=int, default=64)

    s = sub.add_parser("search", help="find the Pareto-optimal sub-networks of a trained run")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--objectives", help="two or more of acc, loss, macs, params, latency, size [acc,macs]")
    s.add_argument("--algorithm", help="nsga2 (default), nsga3, smsemoa, spea2, random, grid, local, midpoint, "
                                       "allocator")
    s.add_argument("--population", type=int, help="configurations per generation [16]")
    s.add_argument("--evaluations", type=int, help="budget of distinct evaluated configurations [96]")
    s.add_argument("--eval-samples", type=int, help="validation examples that score a configuration [500]")
    s.add_argument("--seed", type=int, help="[0]")
    s.add_argument("--constraint", help='e.g. "macs<=7.6e8" or "params<=1e6,macs<8e8"')
    s.add_argument("--budget", help="allocator budget, e.g. macs=7.6e8 or params=1e6")
    s.add_argument("--name", help="search name: results go to RUN/search/NAME [ALGORITHM-OBJECTIVES-sSEED]")
    s.add_argument("--resume", action="store_true", help="continue the search --name with its saved settings")
    s.add_argument("--batch-size", type=int, default=64, help="examples per forward pass [64]")

    x = sub.add_parser("export", help="save a sub-network as a merged transformers model or a PEFT adapter")
    x.add_argument("--run", required=True, help="run directory")
    x.add_argument("--subnet", help="max, mid, min, best (of --search, under --constraint) or a JSON file")
    x.add_argument("--pareto", action="store_true", help="export every member of the search's Pareto front")
    x.add_argument("--search", help="search name (RUN/search/NAME); needed when the run has several")
    x.add_argument("--constraint", help='with --subnet best, e.g. "macs<=7.6e8"')
    x.add_argument("--format", default="merged", choices=["merged", "peft", "compressed"],
                   help="merged transformers model, PEFT adapter, or compressed-tensors (pruned / integer) [merged]")
    x.add_argument("--out", help="output folder [RUN/exports/SUBNET-FORMAT]")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    plots.add_plot_parser(sub)
    return p


def _read_options_file(path: str) -> dict:
    """The training options of a YAML (or JSON) file, keys with ``_`` for ``-``.

    YAML 1.1 reads some unquoted text as other types: ``2:4`` is the base-60 number 124, ``yes``
    a boolean, ``0x1F`` the number 31. An option that must be a string is refused when YAML's
    reading would change the text the user wrote, with that text and how to quote it; text that
    survives (``2020``, ``2024-01-01``) or names one of the option's choices (``mixed-precision:
    no``) is kept as written.

    Raises:
        SupernetError: unreadable file, not a mapping, or a string option YAML read as another type.
    """
    import dataclasses

    import yaml

    from supernet.loader import TrainConfig

    data = validate.read_yaml("config file", path)
    if not isinstance(data, dict):
        raise SupernetError(f"config file {path!r} must hold a mapping of options")
    options = {str(k).replace("-", "_"): v for k, v in data.items()}
    try:  # the composed node tree keeps each scalar's text as written (read_yaml parsed it already)
        root = yaml.compose(validate.read_text("config file", path), Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # pragma: no cover - the file changed since read_yaml parsed it
        return options
    if not isinstance(root, yaml.MappingNode):
        return options
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    choices = {flag.replace("-", "_"): kw["choices"] for flag, kw in TRAIN_FLAGS if "choices" in kw}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = key_node.value
        name = key.replace("-", "_")
        if not kinds.get(name, "").startswith(("str", "list[str]")):
            continue
        for node, top in _yaml_scalars(value_node):
            if node.tag not in _YAML_NON_STRINGS:  # strings, nulls (optional options) and explicit tags
                continue
            value = yaml.constructor.SafeConstructor().construct_object(node)
            if node.value == str(value) or node.value in choices.get(name, ()):
                if top:
                    options[name] = node.value  # kept as the user wrote it: a date would fail as a date
                continue
            where = f"{key}: " if top else ""
            raise SupernetError(f"config file {path!r}: {key}: YAML read {node.value} as {_yaml_kind(value)}; "
                                f"quote it: {where}{json.dumps(node.value)}")
    return options


_YAML_NON_STRINGS = {f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "timestamp")}


def _yaml_scalars(node, top: bool = True):
    """Every scalar node under ``node`` (keys and values), with whether it is ``node`` itself."""
    import yaml

    if isinstance(node, yaml.ScalarNode):
        yield node, top
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _yaml_scalars(item, False)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _yaml_scalars(k, False)
            yield from _yaml_scalars(v, False)


def _yaml_kind(value) -> str:
    """What YAML made of a scalar, in words: ``the number 124``, ``the boolean True``."""
    import datetime

    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return f"a {type(value).__name__} ({value!r})"


def cmd_train(args: argparse.Namespace) -> int:
    from supernet.train import TrainConfig, resume, train

    options = _read_options_file(args.config) if args.config else {}
    flags = {f.replace("-", "_") for f, _ in TRAIN_FLAGS}
    options.update({k: v for k, v in vars(args).items() if k in flags})
    if args.resume:
        extra = set(options) - {"max_steps"}
        if extra:
            raise SupernetError("--resume continues a run with its saved options; only --max-steps may change")
        run_dir = args.resume
        job = lambda: resume(args.resume, options.get("max_steps"))  # noqa: E731
    else:
        cfg = TrainConfig.from_dict(options)
        run_dir = str(cfg.run_dir())
        job = lambda: train(cfg, overwrite=args.overwrite)  # noqa: E731
    try:
        summary = job()
    except KeyboardInterrupt:  # say whether there is a run to resume (config.json is written before step 1)
        if (Path(run_dir) / "config.json").is_file() and (Path(run_dir) / ".supernet-run").is_file():
            print(f"supernet: interrupted; continue with `supernet train --resume {run_dir}`", file=sys.stderr)
        else:
            print("supernet: interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    if summary:
        print(json.dumps({"run": run_dir, **summary}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from supernet.evaluate import eval_run

    if args.batch_size <= 0:
        raise SupernetError("--batch-size must be positive")
    out = eval_run(args.run, args.subnet, args.split, args.predictions, args.limit, args.batch_size,
                   progress=sys.stderr.isatty())
    print(json.dumps(out))
    return 0


SEARCH_DEFAULTS = {"objectives": "acc,macs", "algorithm": "nsga2", "population": 16, "evaluations": 96,
                   "seed": 0, "eval_samples": 500}
SEARCH_SETTINGS = ("objectives", "algorithm", "population", "evaluations", "seed", "constraint", "budget",
                   "eval_samples")


def cmd_search(args: argparse.Namespace) -> int:
    from supernet.search import SearchSettings
    from supernet.searching import run_search_command

    given = {k: getattr(args, k) for k in SEARCH_SETTINGS if getattr(args, k) is not None}
    if args.batch_size <= 0:
        raise SupernetError("--batch-size must be positive")
    if args.name is not None:
        validate.run_name(args.name)
    if args.resume:
        if given:
            raise SupernetError("--resume continues a search with its saved settings; give only --run and --name")
        if args.name is None:
            raise SupernetError("--resume needs the --name of the search to continue")
        settings, samples = None, SEARCH_DEFAULTS["eval_samples"]
    else:
        opts = {**SEARCH_DEFAULTS, **given}
        samples = opts.pop("eval_samples")
        settings = SearchSettings(**opts)
    out = run_search_command(args.run, settings, args.name, args.resume, samples, args.batch_size,
                             progress=sys.stderr.isatty())
    if not out:  # not the main process
        return 0
    _print_front(out)
    return 0


def _print_front(out: dict) -> None:
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
    print(f"Pareto front ({len(front)} of {out['evaluations']} evaluated; accuracy on "
          f"{out['eval_examples']} validation examples, val_/test_ on the whole splits):", file=sys.stderr)
    print(table.to_string(index=False), file=sys.stderr)
    if out["selected"]:
        print(f"allocator's choice: evaluation {out['selected'].get('index')}", file=sys.stderr)
    print(f"files: {out['search']}/{{search.json, history.csv, pareto.csv, subnets/}}", file=sys.stderr)
    print(json.dumps({"search": out["search"], "evaluations": out["evaluations"],
                      "evaluated_now": out["evaluated_now"], "pareto_size": len(front), "processes": out["processes"],
                      "selected": out["selected"]}))


def cmd_export(args: argparse.Namespace) -> int:
    from supernet.exporting import export_command

    out = export_command(args.run, args.subnet, args.format, args.out, args.search, args.constraint, args.pareto,
                         args.overwrite)
    for e in out["exports"]:
        size = f", {e['bytes_on_disk'] / 2**20:.1f} MB on disk" if e.get("bytes_on_disk") else ""
        print(f"exported {e['name']} ({args.format}, {e['shipped_params']:,} parameters shipped{size}, verified: "
              f"max |diff| {e['max_abs_diff']:.2e}) to {e['path']}", file=sys.stderr)
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        return {"train": cmd_train, "eval": cmd_eval, "search": cmd_search,
                "export": cmd_export, "plot": plots.cmd_plot}[args.command](args)
    except SupernetError as e:
        return _fail(str(e))
    except OSError as e:  # the file system said no (disk full, read-only, permissions) somewhere we write
        where = f" {e.filename!r}" if e.filename else ""
        return _fail(f"{e.strerror or type(e).__name__}:{where}" if e.strerror else f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print("supernet: interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print("supernet: error: " + " ".join(message.split()), file=sys.stderr)  # always one line
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
