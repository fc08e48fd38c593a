"""Rebuilding a super-network and its data from options or from a trained run's ``config.json``.

``build`` turns :class:`TrainConfig` into a :class:`Setup` (model with adapters, tokenised
splits, label names); :func:`load_run` does the same for a finished or running run, with the
groups and label names it was trained with, and loads its weights. ``eval``, ``search`` and
``export`` go through here; nothing in this module trains.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from supernet import merges, validate
from supernet import runfiles as runio
from supernet.adapters.calibrate import FROZEN_FILE, calibrate_adapters  # noqa: F401 (FROZEN_FILE: re-exported)
from supernet.compressed_base import (
    LEGACY_ORDER,
    MASKS,
    Compression,
    calibration_batches,
    check_layers,
    compute_masks,
    load_masks,
    make_bases,
    masks_fingerprint,
    save_masks,
)
from supernet.data import BUILTINS, load_task_data
from supernet.errors import SupernetError
from supernet.models import BUILTIN_MODELS, TASKS, check_task, infer_task, load_config, load_model
from supernet.network import SuperNetConfig, SuperNetwork, default_targets, target_layers
from supernet.tasks import Encoded, encode
from supernet.validate import as_float, as_int, as_list, as_str, flag_name, parse_number_list

SAMPLERS = ("uniform", "sandwich")
# The new head of a classification model, trained whole and shared by every sub-network. BERT's
# pooler is part of it: left frozen, a checkpoint whose pooler was never trained (MiniLM's, a
# sentence-transformers model, has weights of std 0.009) squeezes the [CLS] features about 6x,
# and runs got stuck at the majority class (results/stuck.md: before and after over 5 seeds).
HEAD_PATTERNS = ["classifier", "score", "pooler"]
MASKS_FINGERPRINT = "masks_sha256"  # under "bases" in config.json: which mask file belongs to the run


@dataclass
class TrainConfig:
    """One training run; written to ``config.json`` and read back by ``eval`` and ``--resume``.

    The defaults are the embedded default: MiniLM-L6 on Rotten Tomatoes, ranks 32/24/16.
    """

    model: str = "minilm"
    dataset: str = "rotten-tomatoes"
    task: str | None = None  # seq-cls | causal-lm; None: causal-lm for *ForCausalLM checkpoints
    text_column: str = "text"
    label_column: str = "label"
    prompt: str | None = None  # causal-lm prompt with {text}; built-ins bring their own
    choices_column: str | None = None  # multiple choice: a column of answer lists (causal-lm)
    target_modules: list[str] | None = None  # None: every projection in the blocks
    trainable_modules: list[str] | None = None  # trained whole (the new head); None: the task's default
    ranks: list[int] = field(default_factory=lambda: [32, 24, 16])
    alpha: float = 32.0
    scaling: str = "lora"
    dropout: float = 0.0
    groups: str | dict = "block"  # block | module | global | JSON file path | {group: [patterns]}
    sampler: str = "uniform"
    sandwich_random: int = 2  # the k random configs of a sandwich step (besides max and min)
    distill: str = "none"  # none | inplace: smaller sub-networks learn from the largest one's outputs (BigNAS)
    fixed: dict | None = None  # train this one configuration only: a stand-alone network (supernet fidelity)
    max_steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 64
    train_samples: int | None = None  # cap on training examples (first N of the fixed split)
    eval_samples: int | None = 500  # validation examples used by periodic evaluation
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    # the frozen base (supernet.compressed_base.Compression; docs/METHODS.md section 2)
    sparsity: float = 0.0
    prune: str = "wanda"
    pattern: str = "unstructured"
    bits: int | None = None
    group_size: int = 64
    adapter_merge: str = "plain"  # plain | sparse (SparsePEFT) | qa-sparse (QA-SparsePEFT)
    adapter: str = "lora"  # the adapter kind (supernet.adapters.ADAPTER_KINDS)
    scalings: list[str] = field(default_factory=list)  # scaling modes searched (empty: the one --scaling)
    scaling_per: str = "group"  # a searched scaling: one per group, or one global
    widths: list[float] = field(default_factory=list)  # FFN neuron fractions searched (elastic width)
    heads: list[float] = field(default_factory=list)  # attention-head fractions searched
    width_groups: str = "block"  # block | global: one width and heads choice per block, or one for the model
    outer_rank: int | None = None  # --adapter nora: rank of the frozen outer pair (None: 64)
    union: list[str] | None = None  # --adapter jactus: parts of each union of subspaces (None: W,x,g)
    thresholds: list[float] | None = None  # --adapter jactus: energy thresholds of W, x, g (None: 0.95,0.9,0.9)
    core_fractions: list[float] | None = None  # --adapter jactus: core fractions searched (None: 1.0)
    budget: str | None = None  # --adapter jactus: params=F, the share of the adapted weights kept (None: 0.8)
    calibration_samples: int = 128
    calibration_order: str = "dense"  # Wanda: dense (one pass) | sequential (block by block, pruned inputs)
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp32
    name: str | None = None
    out: str = "runs"

    def __post_init__(self) -> None:
        """Every option checked where it enters: types, finite ranges, names and patterns."""
        self._coerce_types()
        if self.task is not None and self.task not in TASKS:
            raise SupernetError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.sampler not in SAMPLERS:
            raise SupernetError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.distill not in ("none", "inplace"):
            raise SupernetError(f"unknown --distill {self.distill!r}; use none or inplace")
        if self.fixed is not None and not isinstance(self.fixed, dict):
            raise SupernetError("the fixed configuration must be a mapping {dimension: choice}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise SupernetError("--mixed-precision must be auto, no or bf16")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_every", "save_every",
                     "train_samples", "eval_samples"):
            if getattr(self, name) is not None:
                validate.number(flag_name(name), getattr(self, name), low=0, low_open=True)
        for name in ("lr", "alpha", "max_grad_norm"):
            validate.number(flag_name(name), getattr(self, name), low=0, low_open=True)
        validate.number("--sandwich-random", self.sandwich_random, low=0)
        validate.number("--weight-decay", self.weight_decay, low=0)
        validate.seed("--seed", self.seed)
        validate.number("--warmup-ratio", self.warmup_ratio, low=0, high=1)
        if self.warmup_ratio >= 1:
            raise SupernetError("--warmup-ratio must be below 1")
        validate.number("--dropout", self.dropout, low=0, high=1)
        if self.dropout >= 1:
            raise SupernetError("--dropout must be below 1")
        for name in ("model", "dataset", "text_column", "label_column", "out"):
            validate.text_option(flag_name(name), getattr(self, name))
        if self.choices_column is not None:
            validate.text_option("--choices-column", self.choices_column)
        if self.prompt is not None:
            validate.prompt_template("--prompt", self.prompt)
        if self.target_modules is not None:
            self.target_modules = validate.patterns("--target-modules", self.target_modules)
        if self.trainable_modules is not None:
            self.trainable_modules = validate.patterns("--trainable-modules", self.trainable_modules) \
                if self.trainable_modules else []
        if isinstance(self.groups, dict):
            self.groups = validate.groups_mapping("--groups", self.groups)
        else:
            validate.text_option("--groups", self.groups)
        if self.name is not None:
            validate.run_name(self.name)
        for name in ("sparsity", "group_size", "calibration_samples"):
            validate.number(flag_name(name), getattr(self, name))
        for name in ("prune", "pattern", "adapter_merge", "calibration_order"):
            validate.text_option(flag_name(name), getattr(self, name))
        comp = self.compression()  # ranges, the pattern, bits
        merges.check_options(self.adapter_merge, comp.bits is not None, comp.prunes, self.dropout)
        if self.adapter == "jactus" and (comp.active or self.adapter_merge != "plain"):
            raise SupernetError("--adapter jactus replaces the frozen weight by its own factors: it takes a dense "
                                "base and --adapter-merge plain (no --sparsity, --bits)")
        SuperNetConfig(["any"], self.ranks, self.alpha, self.scaling, self.dropout, "block", [], self.adapter_merge,
                       self.adapter, self.scalings, self.scaling_per, self.widths, self.heads,
                       self.width_groups, outer_rank=self.outer_rank, union=self.union, thresholds=self.thresholds,
                       core_fractions=self.core_fractions,
                       retain=validate.budget_share(self.budget))  # the adapter's and width's options, now
        # a local model folder or data file is kept as an absolute path, so that the run can
        # be evaluated, searched and exported from any working directory
        for name in ("model", "dataset"):
            v = getattr(self, name)
            if v not in BUILTIN_MODELS and v not in BUILTINS and Path(v).exists():
                setattr(self, name, str(Path(v).resolve()))

    def _coerce_types(self) -> None:
        """Options may come from YAML (``lr: 5e-4`` is a string there, ``no`` a boolean):
        convert each to its field's type or fail with one clear line."""
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            kind = str(f.type)
            if v is None and "None" in kind:
                continue
            flag = "--" + f.name.replace("_", "-")
            try:
                if kind.startswith("list[int]"):
                    v = parse_number_list(v, flag, int) if isinstance(v, str) else [as_int(x) for x in as_list(v)]
                elif kind.startswith("list[float]"):
                    v = parse_number_list(v, flag, float) if isinstance(v, str) else [as_float(x) for x in as_list(v)]
                elif kind.startswith("list[str]"):
                    v = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [
                        as_str(x) for x in as_list(v)]
                elif kind.startswith("int"):
                    v = as_int(v)
                elif kind.startswith("float"):
                    v = as_float(v)
                elif kind.startswith("str | dict"):
                    v = v if isinstance(v, dict) else as_str(v)
                elif kind.startswith("str"):
                    v = as_str(v)
            except (TypeError, ValueError):
                raise SupernetError(f"{flag} has the wrong type: {v!r}") from None
            setattr(self, f.name, v)

    def compression(self) -> Compression:
        """The frozen base's compression options, validated."""
        return Compression(self.sparsity, self.prune, self.pattern, self.bits, self.group_size,
                           self.calibration_samples, self.calibration_order)

    def run_dir(self) -> Path:
        if self.name is not None:
            return Path(self.out) / self.name
        name = f"{Path(self.model).name}-{Path(self.dataset).stem}"
        return Path(self.out) / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "run")

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict):
            raise SupernetError("training options must be a mapping")
        unknown = sorted(set(data) - names)
        if unknown:
            raise SupernetError(f"unknown training option(s): {', '.join(map(str, unknown))}")
        return cls(**data)


def load_groups(spec: str | dict) -> str | dict:
    if isinstance(spec, dict) or spec in ("block", "module", "global"):
        return spec
    if not Path(spec).exists():
        raise SupernetError(f"--groups must be block, module, global or a JSON file; {spec!r} is none")
    return validate.groups_mapping(f"groups file {spec!r}", validate.read_json("groups file", spec))


@dataclass
class Setup:
    """Everything built from a :class:`TrainConfig` before anything is written."""

    cfg: TrainConfig
    task: str
    net: SuperNetwork
    tokenizer: object
    enc: Encoded
    label_names: list[str]
    supernet_config: SuperNetConfig
    masks: dict | None = None  # the frozen bases' pruning masks (saved with the run)
    width_order: dict | None = None  # the importance order of neurons and heads (elastic width)
    frozen: dict | None = None  # an adapter kind's calibrated frozen state (NoRA's outer pairs)

    def save_masks(self, run_dir: Path) -> None:
        """What the frozen base needs besides the model: masks and the width order."""
        if self.masks is not None:
            save_masks(Path(run_dir) / MASKS, self.masks)  # its fingerprint is in run_record's "bases"
        if self.width_order is not None:
            from supernet.width_order import ORDER_FILE, save_order

            save_order(Path(run_dir) / ORDER_FILE, self.width_order)
        if self.frozen is not None:
            runio.save_tensors(Path(run_dir) / FROZEN_FILE, self.frozen)


def build(cfg: TrainConfig, seed: int | None = None, run_dir: str | Path | None = None,
          progress: bool = False) -> Setup:
    """Load model and data, compress the frozen base, inject adapters; every user error surfaces here.

    ``run_dir``: rebuild a recorded run, whose pruning masks are read from it rather than
    calibrated again (calibration depends on floating-point reduction order), and must be the
    masks its ``config.json`` recorded the fingerprint of.
    """
    set_seed(cfg.seed if seed is None else seed)
    groups = load_groups(cfg.groups)
    _, model_config = load_config(cfg.model)
    task = cfg.task or infer_task(model_config)
    check_task(cfg.model, model_config, task, cfg.max_length)
    data = load_task_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.prompt, cfg.choices_column)
    if data.has_choices and task != "causal-lm":
        raise SupernetError("--choices-column needs a causal-LM model (answers are scored by likelihood)")
    model, tokenizer = load_model(cfg.model, task, labels=[str(n) for n in data.label_names])
    if cfg.train_samples is not None:
        data.splits["train"] = data.splits["train"].select(range(min(cfg.train_samples, len(data.splits["train"]))))
    sn_cfg = SuperNetConfig(
        target_modules=cfg.target_modules or default_targets(model),
        ranks=list(cfg.ranks),
        alpha=cfg.alpha,
        scaling=cfg.scaling,
        dropout=cfg.dropout,
        groups=groups,
        trainable_modules=cfg.trainable_modules if cfg.trainable_modules is not None else
        HEAD_PATTERNS if task == "seq-cls" else [],
        merge=cfg.adapter_merge,
        adapter=cfg.adapter,
        scalings=list(cfg.scalings),
        scaling_per=cfg.scaling_per,
        widths=list(cfg.widths),
        heads=list(cfg.heads),
        width_groups=cfg.width_groups,
        outer_rank=cfg.outer_rank,
        union=cfg.union,
        thresholds=cfg.thresholds,
        core_fractions=cfg.core_fractions,
        retain=validate.budget_share(cfg.budget),
    )
    enc = encode(data, tokenizer, task, cfg.max_length)
    order = None
    if cfg.widths or cfg.heads:  # before any pruning or quantisation: they see the re-ordered weights
        from supernet.width_order import reorder

        order = reorder(model, lambda: calibration_batches(enc, cfg.calibration_samples, cfg.seed),
                        bool(cfg.widths), bool(cfg.heads), run_dir)
    comp, bases, masks = cfg.compression(), None, None
    if comp.active:
        targets = target_layers(model, sn_cfg)
        check_layers(targets, comp)
        if comp.prunes and run_dir is not None:
            record = runio.read_run_config(run_dir)
            masks = load_masks(Path(run_dir) / MASKS, targets, recorded_masks_fingerprint(record))
        elif comp.prunes:
            batches = calibration_batches(enc, comp.calibration_samples, cfg.seed) if comp.calibrates else None
            device = "cuda" if torch.cuda.is_available() else "cpu"
            masks = compute_masks(model, targets, comp, batches, progress=progress, device=device)
        bases = make_bases(targets, masks, comp, cfg.adapter_merge)
    net = SuperNetwork(model, sn_cfg, bases)
    frozen = calibrate_adapters(net, lambda: calibration_batches(enc, cfg.calibration_samples, cfg.seed),
                                run_dir, progress)
    return Setup(cfg, task, net, tokenizer, enc, data.label_names, sn_cfg, masks, order, frozen)


def run_record(setup: Setup) -> dict:
    """What ``config.json`` holds: enough to rebuild the super-network and its task."""
    sn = dataclasses.asdict(setup.supernet_config)
    named = {k: setup.net.space.named_config(k) for k in ("max", "mid", "min")}
    return {
        "train": dataclasses.asdict(setup.cfg),
        "supernet": sn,
        "task": setup.task,
        "label_names": setup.label_names,
        "groups": setup.net.groups,
        "choices": setup.net.space.choices,
        **{k: v for k, v in setup.net.space.to_json().items() if k == "kinds"},  # dimensions that are not ranks
        "macs": {k: setup.net.macs(c, setup.cfg.max_length) for k, c in named.items()},
        "trainable_params": {k: setup.net.trainable_params(c) for k, c in named.items()},
        "size": {k: setup.net.size(c) for k, c in named.items()},
        "bases": {**base_summary(setup.net),
                  **({MASKS_FINGERPRINT: masks_fingerprint(setup.masks)} if setup.masks is not None else {})},
        **({"adapters": summaries} if (summaries := {n: s for n, a in setup.net.adapters.items()
                                                     if (s := a.summary())}) else {}),
    }


def recorded_masks_fingerprint(record: dict) -> str | None:
    """The fingerprint of its masks a run recorded; None for a run written before they were recorded."""
    bases = record.get("bases")
    value = bases.get(MASKS_FINGERPRINT) if isinstance(bases, dict) else None
    # an edited value of another type can only fail the comparison, with the same one clear line
    return value if value is None or isinstance(value, str) else str(value)


def base_summary(net: SuperNetwork) -> dict:
    """The frozen bases at a glance: kind, overall sparsity of the adapted layers, bits, bytes."""
    bases = [a.base for a in net.adapters.values()]
    total = sum(b.in_features * b.out_features for b in bases)
    kinds = sorted({b.kind for b in bases})
    return {"kind": kinds[0] if len(kinds) == 1 else kinds, "sparsity": 1 - sum(b.nnz() for b in bases) / total,
            "bits": getattr(bases[0], "bits", None), "group_size": getattr(bases[0], "group_size", None),
            "weight_bytes": sum(b.weight_bytes() for b in bases), "merge": net.config.merge}


def config_of_run(record: dict) -> TrainConfig:
    """The training options of a recorded run, with its groups as trained (not a groups file
    that may have changed since)."""
    train = record["train"]
    if isinstance(train, dict) and "calibration_order" not in train:
        train = {**train, "calibration_order": LEGACY_ORDER}  # recorded before the option: one dense pass
    sn = record.get("supernet")
    if isinstance(train, dict) and "trainable_modules" not in train and isinstance(sn, dict) \
            and isinstance(sn.get("trainable_modules"), list):  # recorded before the option: the head it trained
        train = {**train, "trainable_modules": sn["trainable_modules"]}
    cfg = TrainConfig.from_dict(train)  # every option checked again: the file may be edited
    groups = record["supernet"].get("groups") if isinstance(record["supernet"], dict) else None
    if groups is not None:
        cfg.groups = validate.groups_mapping("config.json groups", groups) if isinstance(groups, dict) else groups
    return cfg


def check_rebuilt(setup: Setup, record: dict, run_dir: str | Path) -> None:
    """Refuse a run whose model or data no longer match what it was trained on."""
    names = record.get("label_names")
    if names is not None and names != setup.label_names:
        raise SupernetError(f"run {str(run_dir)!r} was trained with labels {names}, but its dataset now has "
                            f"{setup.label_names}")
    if record.get("groups") is not None and record["groups"] != setup.net.groups:
        raise SupernetError(f"run {str(run_dir)!r} does not match its model any more (groups differ)")


def load_run(run_dir: str | Path, weights: bool = True) -> tuple[Setup, dict]:
    """Rebuild a run's super-network and data from ``config.json`` and load its trained weights
    (the final ones if training finished, else the latest checkpoint's)."""
    record = runio.read_run_config(run_dir)
    cfg = config_of_run(record)
    path = runio.weights_path(run_dir) if weights else None
    setup = build(cfg, run_dir=run_dir)
    check_rebuilt(setup, record, run_dir)
    if path is not None:
        setup.net.load_trainable_state_dict(runio.load_tensors(path))
    return setup, record
