"""``supernet`` command line: the parser (:func:`build_parser`) and :func:`main`, which runs the
subcommand's ``run(args)`` in :mod:`supernet.commands` (``train``, ``eval``, ``search``, ``export``,
``fidelity``, ``plot``, one module each).

Errors a user can cause end as one line on stderr (``supernet: error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

from supernet.dimensions import SCALINGS
from supernet.errors import SupernetError
from supernet.merges import MERGES


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
    ("trainable-modules", {"type": _csv, "help": "name patterns of modules trained whole, shared by every "
                                                  "sub-network (the new head) [classifier,score,pooler for seq-cls]"}),
    ("ranks", {"help": "rank choices, e.g. 32,24,16"}),
    ("alpha", {"type": float, "help": "LoRA alpha [32]"}),
    ("adapter", {"help": "adapter kind, one of the registry supernet.adapters.ADAPTER_KINDS [lora]"}),
    ("outer-rank", {"type": int, "help": "--adapter nora: rank of the frozen outer pair from the activation-aware "
                                         "SVD; --ranks are then the inner ranks [64]"}),
    ("union", {"help": "--adapter jactus: the parts of each layer's union of subspaces, W and any of x (input "
                       "covariance), g (output-gradient covariance) [W,x,g]"}),
    ("thresholds", {"help": "--adapter jactus: energy thresholds of W, x and g, e.g. 0.95,0.9,0.9 [0.95,0.9,0.9]"}),
    ("budget", {"help": "--adapter jactus: params=F, the share of the adapted layers' weight numbers kept; ranks "
                        "are allocated across layers by marginal gain per parameter [params=0.8]"}),
    ("core-fractions", {"help": "--adapter jactus: fractions of each layer's allocated core rank searched, "
                                "e.g. 1.0,0.75,0.5 [1.0]"}),
    ("scaling", {"choices": list(SCALINGS), "help": "alpha/r_max, alpha/r or alpha/sqrt(r) [lora]"}),
    ("scalings", {"help": "search the scaling mode too: two or more of fixed,lora,rora, sampled each step with "
                          "the ranks (the first is max's)"}),
    ("scaling-per", {"choices": ["group", "global"], "help": "a searched scaling: one per rank group or one for "
                                                               "the network [group]"}),
    ("widths", {"help": "elastic width: fractions of each block's FFN neurons searched, e.g. 1.0,0.75,0.5 "
                        "(neurons importance-ordered once before training)"}),
    ("heads", {"help": "elastic heads: fractions of each block's attention heads searched, e.g. 1.0,0.5 "
                       "(kept within each KV group)"}),
    ("width-groups", {"choices": ["block", "global"],
                      "help": "one width and heads choice per block, or one for the model (stock-loadable) [block]"}),
    ("dropout", {"type": float}),
    ("groups", {"help": "block, module, global or a JSON file {group: [patterns]} [block]"}),
    ("sampler", {"choices": ["uniform", "sandwich"], "help": "[uniform]"}),
    ("sandwich-random", {"type": int, "help": "random configs per sandwich step [2]"}),
    ("distill", {"choices": ["none", "inplace"],
                 "help": "inplace: every smaller sub-network learns the largest one's outputs in the same step "
                         "(BigNAS) instead of the labels; needs --sampler sandwich [none]"}),
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
    ("adapter-merge", {"choices": list(MERGES),
                       "help": "plain LoRA, SparsePEFT (update masked) or QA-SparsePEFT (trained through "
                               "the quantiser) [plain]"}),
    ("calibration-samples", {"type": int, "help": "training sequences for Wanda's statistics [128]"}),
    ("calibration-order", {"choices": ["sequential", "dense"],
                           "help": "Wanda's statistics block by block through the blocks already pruned "
                                   "(as the reference), or all from the dense model [dense]"}),
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
    h = _search_help()
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--objectives", metavar="A,B,...", help=h["objectives"])
    s.add_argument("--algorithm", metavar="NAME", help=h["algorithm"])
    s.add_argument("--population", type=int, help=h["population"])
    s.add_argument("--evaluations", type=int, help=h["evaluations"])
    s.add_argument("--eval-samples", type=int, help=h["eval_samples"])
    s.add_argument("--final-samples", type=int,
                   help="the first N examples of the validation and test splits re-score the front [whole splits]")
    s.add_argument("--seed", type=int, help=h["seed"])
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
    x.add_argument("--peft-scale", choices=["folded", "pattern"],
                   help="--format peft: folded: every module's scale in lora_B, one global lora_alpha / r (what vLLM "
                        "serves); pattern: the trained scales in alpha_pattern [folded]")
    x.add_argument("--sparse-storage", choices=["dense", "bitmask"],
                   help="--format compressed on a floating-point pruned base: dense: zeros kept in a standard "
                        "checkpoint (stock transformers, vLLM); bitmask: compressed-tensors sparse-bitmask, which only "
                        "supernet.compress.load_compressed reads [dense]")
    x.add_argument("--out", help="output folder [RUN/exports/SUBNET-FORMAT]")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    f = sub.add_parser("fidelity", help="train sub-networks stand-alone and measure how well the super-network "
                                        "ranks them (Kendall tau, Spearman rho)")
    f.add_argument("--run", required=True, help="run directory")
    f.add_argument("--configs", type=int, default=10, help="configurations: max, min, mid and a spread over MACs [10]")
    f.add_argument("--seed", type=int, default=0, help="seeds the spread and the bootstrap [0]")
    f.add_argument("--eval-samples", type=int, help="validation examples that score each network [whole split]")
    f.add_argument("--name", help="study name: results go to RUN/fidelity/NAME [nN-sSEED]")
    f.add_argument("--batch-size", type=int, default=64, help="examples per forward pass [64]")

    g = sub.add_parser("plot", help="PNG figures (and their CSV data) of a run's training and searches")
    g.add_argument("--run", required=True, help="run directory")
    g.add_argument("--search", help="only the progress plot of this search (a folder name under RUN/search)")
    g.add_argument("--out", help="output folder [RUN/plots]")
    return p


def _search_help() -> dict[str, str]:
    """The help of the search settings, generated from the registries and SearchSettings's defaults."""
    from supernet.commands.search import EVAL_SAMPLES
    from supernet.search import OBJECTIVES, STRATEGIES, SearchSettings

    default = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
    objectives = ", ".join(f"{name} ({o.label})" if o.label != name else name for name, o in OBJECTIVES.items())
    strategies = "; ".join(f"{name} = {s.description}" for name, s in STRATEGIES.items())
    return {
        "objectives": f"two or more of {objectives}, comma-separated [{','.join(default['objectives'])}]",
        "algorithm": f"search strategy [{default['algorithm']}]: {strategies}",
        "population": f"configurations per generation [{default['population']}]",
        "evaluations": f"budget of distinct evaluated configurations [{default['evaluations']}]",
        "eval_samples": f"validation examples that score a configuration [{EVAL_SAMPLES}]",
        "seed": f"seeds the stochastic strategies [{default['seed']}]",
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        from supernet import commands

        return commands.run(args)
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
