"""NLS training: one sub-adapter configuration per optimizer step, through ``accelerate``.

Every process derives a step's configuration from ``(seed, step)`` alone, so under
``accelerate launch`` all processes train the same sub-network at the same step; data order
is a permutation drawn from ``(seed, epoch)``, sharded by process. A run resumed from its
checkpoint reproduces the uninterrupted run exactly (weights, optimizer, scheduler, RNG).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from supernet import run as runio
from supernet import validate
from supernet.data import BUILTINS, load_task_data
from supernet.errors import SupernetError
from supernet.models import BUILTIN_MODELS, TASKS, check_task, infer_task, load_config, load_model
from supernet.network import SuperNetConfig, SuperNetwork, default_targets
from supernet.space import Config
from supernet.tasks import BatchOrder, Encoded, collate, encode, evaluate, rows_of

SAMPLERS = ("uniform", "sandwich")
HEAD_PATTERNS = ["classifier", "score"]


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
    ranks: list[int] = field(default_factory=lambda: [32, 24, 16])
    alpha: float = 32.0
    scaling: str = "lora"
    dropout: float = 0.0
    groups: str | dict = "block"  # block | module | global | JSON file path | {group: [patterns]}
    sampler: str = "uniform"
    sandwich_random: int = 2  # the k random configs of a sandwich step (besides max and min)
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
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise SupernetError("--mixed-precision must be auto, no or bf16")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "eval_every", "save_every",
                     "train_samples", "eval_samples"):
            if getattr(self, name) is not None:
                validate.number(_flag(name), getattr(self, name), low=0, low_open=True)
        for name in ("lr", "alpha", "max_grad_norm"):
            validate.number(_flag(name), getattr(self, name), low=0, low_open=True)
        validate.number("--sandwich-random", self.sandwich_random, low=0)
        validate.number("--weight-decay", self.weight_decay, low=0)
        validate.number("--seed", self.seed, low=0, high=validate.SEED_MAX)
        validate.number("--warmup-ratio", self.warmup_ratio, low=0, high=1)
        if self.warmup_ratio >= 1:
            raise SupernetError("--warmup-ratio must be below 1")
        validate.number("--dropout", self.dropout, low=0, high=1)
        if self.dropout >= 1:
            raise SupernetError("--dropout must be below 1")
        for name in ("model", "dataset", "text_column", "label_column", "out"):
            validate.text_option(_flag(name), getattr(self, name))
        if self.choices_column is not None:
            validate.text_option("--choices-column", self.choices_column)
        if self.prompt is not None:
            validate.prompt_template("--prompt", self.prompt)
        if self.target_modules is not None:
            self.target_modules = validate.patterns("--target-modules", self.target_modules)
        if isinstance(self.groups, dict):
            self.groups = validate.groups_mapping("--groups", self.groups)
        else:
            validate.text_option("--groups", self.groups)
        if self.name is not None:
            validate.run_name(self.name)
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
                    v = parse_int_list(v, flag) if isinstance(v, str) else [_as_int(x) for x in _as_list(v)]
                elif kind.startswith("list[str]"):
                    v = [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [
                        _as_str(x) for x in _as_list(v)]
                elif kind.startswith("int"):
                    v = _as_int(v)
                elif kind.startswith("float"):
                    v = _as_float(v)
                elif kind.startswith("str | dict"):
                    v = v if isinstance(v, dict) else _as_str(v)
                elif kind.startswith("str"):
                    v = _as_str(v)
            except (TypeError, ValueError):
                raise SupernetError(f"{flag} has the wrong type: {v!r}") from None
            setattr(self, f.name, v)

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


def _as_list(v) -> list:
    if not isinstance(v, (list, tuple)):
        raise TypeError
    return list(v)


def _as_int(v) -> int:
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        raise TypeError
    return int(v)


def _as_float(v) -> float:
    if isinstance(v, bool):
        raise TypeError
    return float(v)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_str(v) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise TypeError
    return str(v)


def parse_int_list(text: str, what: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise SupernetError(f"{what} is empty")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise SupernetError(f"{what} must be comma-separated integers, got {text!r}") from None


def load_groups(spec: str | dict) -> str | dict:
    if isinstance(spec, dict) or spec in ("block", "module", "global"):
        return spec
    if not Path(spec).exists():
        raise SupernetError(f"--groups must be block, module, global or a JSON file; {spec!r} is none")
    return validate.groups_mapping(f"groups file {spec!r}", validate.read_json("groups file", spec))


def step_configs(net: SuperNetwork, sampler: str, seed: int, step: int, k: int = 2) -> list[Config]:
    """The sub-networks trained at ``step``: a function of ``(seed, step)`` only.

    ``uniform``: one configuration drawn uniformly (Shears / NNCF NLS). ``sandwich``: the
    largest, the smallest and ``k`` random ones, their gradients accumulated.
    """
    rng = np.random.default_rng([seed, step])
    if sampler == "uniform":
        return [net.sample(rng)]
    return [net.max_config(), net.min_config()] + [net.sample(rng) for _ in range(k)]


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


def build(cfg: TrainConfig, seed: int | None = None) -> Setup:
    """Load model and data and inject adapters; every user error surfaces here."""
    set_seed(cfg.seed if seed is None else seed)
    groups = load_groups(cfg.groups)
    _, model_config = load_config(cfg.model)
    task = cfg.task or infer_task(model_config)
    check_task(cfg.model, model_config, task, cfg.max_length)
    data = load_task_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.prompt, cfg.choices_column)
    if data.has_choices and task != "causal-lm":
        raise SupernetError("--choices-column needs a causal-LM model (answers are scored by likelihood)")
    model, tokenizer = load_model(cfg.model, task, num_labels=len(data.label_names))
    if cfg.train_samples is not None:
        data.splits["train"] = data.splits["train"].select(range(min(cfg.train_samples, len(data.splits["train"]))))
    sn_cfg = SuperNetConfig(
        target_modules=cfg.target_modules or default_targets(model),
        ranks=list(cfg.ranks),
        alpha=cfg.alpha,
        scaling=cfg.scaling,
        dropout=cfg.dropout,
        groups=groups,
        trainable_modules=HEAD_PATTERNS if task == "seq-cls" else [],
    )
    net = SuperNetwork(model, sn_cfg)
    enc = encode(data, tokenizer, task, cfg.max_length)
    return Setup(cfg, task, net, tokenizer, enc, data.label_names, sn_cfg)


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def config_digest(config: Config) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class Trainer:
    """Runs NLS training for a :class:`Setup` into a run directory.

    Args:
        setup: the built model, data and super-network.
        run_dir: where to write; must not exist unless ``resume``.
        on_step: called after every optimizer step with ``(step, trainer)``; raising from
            it interrupts training (tests use this to simulate a crash).
    """

    def __init__(self, setup: Setup, run_dir: Path, on_step: Callable[[int, Trainer], None] | None = None):
        self.s = setup
        self.cfg = setup.cfg
        self.run_dir = Path(run_dir)
        self.on_step = on_step
        mp = self.cfg.mixed_precision
        if mp == "auto":
            env = os.environ.get("ACCELERATE_MIXED_PRECISION")
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            mp = env or ("bf16" if cuda_bf16 else "no")
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: gloo on CPU.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        _warn_single_cpu_launch()
        self.accelerator = Accelerator(mixed_precision=mp, cpu=distributed and not torch.cuda.is_available())
        self.net = setup.net
        self.params = [p for p in self.net.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(self.cfg.warmup_ratio * self.cfg.max_steps), self.cfg.max_steps
        )
        self.model = self.accelerator.prepare(self.net.model)
        self.step = 0
        acc = self.accelerator
        self.order = BatchOrder(len(setup.enc.splits["train"]), self.cfg.batch_size, self.cfg.seed,
                                acc.num_processes, acc.process_index)

    # ---------------------------------------------------------------- data
    def micro_batch(self, m: int) -> dict[str, torch.Tensor]:
        """The ``m``-th micro-batch of this process."""
        batch = collate(self.s.enc, rows_of(self.s.enc.splits["train"], self.order.indices(m)))
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Write ``checkpoint.tmp`` in full (``state.json`` last), then swap it in atomically."""
        acc = self.accelerator
        final = self.run_dir / runio.CHECKPOINT
        tmp = self.run_dir / (runio.CHECKPOINT + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / f"rng{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            runio.save_tensors(tmp / "trainable.safetensors", self.net.trainable_state_dict())
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "optimizer.pt")
            runio.write_json(tmp / "state.json", {"step": self.step, "processes": acc.num_processes})
            runio.swap_dir(tmp, final)
        acc.wait_for_everyone()

    def load_checkpoint(self) -> None:
        """Load the newest complete checkpoint; with none yet (stopped before the first one), start at 0."""
        if self.accelerator.is_main_process:
            runio.settle_checkpoints(self.run_dir)
        self.accelerator.wait_for_everyone()
        found, any_dir = runio.checkpoints(self.run_dir)
        if not found:
            if any_dir:
                raise SupernetError(f"run {str(self.run_dir)!r} has no readable checkpoint to resume from")
            self.step = 0
            return
        step, ckpt = found[0]
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("processes", 1) != self.accelerator.num_processes:
            raise SupernetError(
                f"checkpoint was written by {state.get('processes')} process(es); resume with the same number"
            )
        self.net.load_trainable_state_dict(runio.load_tensors(ckpt / "trainable.safetensors"))
        try:
            opt = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
            rng = load_file(str(ckpt / f"rng{self.accelerator.process_index}.safetensors"))
        except Exception as e:  # a truncated or foreign file: many error types, one message
            raise SupernetError(f"checkpoint of {str(self.run_dir)!r} is corrupt: {type(e).__name__}") from None
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step = step

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> list[dict]:
        rows = []
        for name in ("max", "mid", "min"):
            self.net.activate(self.net.space.named_config(name))
            res = evaluate(self.net.model, self.s.enc, "validation", limit=self.cfg.eval_samples,
                           device=self.accelerator.device)
            rows.append({"step": self.step, "subnet": name, "accuracy": res["accuracy"], "loss": res["loss"],
                         "examples": res["examples"]})
        self.net.reset()
        return rows

    # ---------------------------------------------------------------- loop
    def train(self) -> dict:
        acc, cfg = self.accelerator, self.cfg
        main = acc.is_main_process
        log_path = self.run_dir / "train_log.csv"
        eval_path = self.run_dir / "eval_log.csv"
        if main:
            _truncate_log(log_path, self.step)
            _truncate_log(eval_path, self.step)
        acc.wait_for_everyone()
        trace = None
        if acc.num_processes > 1:
            trace = open(self.run_dir / f"process{acc.process_index}.jsonl", "a")
        columns = ["step", "epoch", "loss", "lr", "grad_norm", "seconds", "config"]
        log = _CsvAppender(log_path, columns) if main else None
        elog = _CsvAppender(eval_path, ["step", "subnet", "accuracy", "loss", "examples"]) if main else None
        last_eval: list[dict] = []
        diverged = False
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not main, dynamic_ncols=True)
        self.model.train()
        t0 = time.perf_counter()
        while self.step < cfg.max_steps:
            configs = step_configs(self.net, cfg.sampler, cfg.seed, self.step, cfg.sandwich_random)
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            n_back = cfg.grad_accum * len(configs)
            k = 0
            active = []  # what the layers really ran, for the per-process trace
            for micro in range(cfg.grad_accum):
                batch = self.micro_batch(self.step * cfg.grad_accum + micro)
                for config in configs:
                    self.net.activate(config)
                    if trace is not None:
                        active.append(config_digest(self.net.active_config()))
                    k += 1
                    sync = contextlib.nullcontext() if k == n_back else acc.no_sync(self.model)
                    with sync:
                        loss = self.model(**batch).loss / n_back
                        acc.backward(loss)
                    total += float(loss.detach())
            grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            if acc.num_processes > 1:  # log the loss of the whole global batch
                total = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="mean"))
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            if trace is not None:
                trace.write(json.dumps({"step": self.step, "configs": active}) + "\n")
            if main and not math.isfinite(total) and not diverged:
                diverged = True
                bar.write(f"supernet: warning: the training loss is {total} at step {self.step}: training diverged "
                          "(lower --lr or --max-grad-norm)")
            if main:
                log.write([self.step, self.order.epoch_of(self.step * cfg.grad_accum - 1), f"{total:.6f}",
                           f"{lr:.3e}", f"{float(grad_norm):.4f}",
                           f"{time.perf_counter() - t0:.2f}", json.dumps(configs[0] if len(configs) == 1 else configs)])
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                if main:
                    rows = last_eval = self.validate()
                    for r in rows:
                        elog.write([r["step"], r["subnet"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", r["examples"]])
                    bar.write(f"step {self.step}: " + ", ".join(
                        f"{r['subnet']} acc {r['accuracy']:.3f}" for r in rows))
                acc.wait_for_everyone()
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if self.on_step is not None:
                self.on_step(self.step, self)
        bar.close()
        if main and not last_eval:  # resumed after the last step: its validation is in the log
            last_eval = _rows_at(eval_path, self.step) or self.validate()
        self.net.reset()
        final = self.net.trainable_state_dict()
        if trace is not None:
            trace.write(json.dumps({"step": self.step, "weights": weights_digest(final)}) + "\n")
            trace.close()
        summary = {}
        if main:
            runio.save_tensors(self.run_dir / runio.ADAPTER, final)
            summary = {"steps": self.step, "train_seconds": round(time.perf_counter() - t0, 2),
                       "processes": acc.num_processes, "validation": last_eval}
            runio.write_json(self.run_dir / runio.SUMMARY, summary)
        acc.wait_for_everyone()
        return summary


def _warn_single_cpu_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process unless mpirun is set up
    (accelerate's simple launcher); say so instead of silently training on one process."""
    env = os.environ
    asked_many = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in env
    launched = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if asked_many and not launched:
        print("supernet: note: `accelerate launch --cpu` started one process (accelerate spawns several CPU "
              "processes only through mpirun); for N CPU processes use `accelerate launch --multi_gpu "
              "--num_processes N` or `torchrun --nproc_per_node N`, which supernet runs on gloo", file=sys.stderr)


class _CsvAppender:
    def __init__(self, path: Path, header: list[str]):
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(header)
            self.f.flush()

    def write(self, row: list) -> None:
        self.w.writerow(row)
        self.f.flush()


def _log_rows(path: Path) -> tuple[list[str], list[list[str]], int]:
    """Header, the rows whose step parses, and how many rows did not (hand-edited or torn)."""
    with open(path, newline="", errors="replace") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], [], 0
    good = []
    for r in rows[1:]:
        try:
            if len(r) == len(rows[0]):
                int(r[0])
                good.append(r)
        except ValueError:
            pass
    return rows[0], good, len(rows) - 1 - len(good)


def _truncate_log(path: Path, step: int) -> None:
    """Drop rows past ``step`` (written after the checkpoint we resume from) and unreadable rows."""
    if not path.exists():
        return
    header, rows, bad = _log_rows(path)
    if not header:
        return
    if bad:
        print(f"supernet: note: dropped {bad} unreadable row(s) from {path}", file=sys.stderr)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + [r for r in rows if int(r[0]) <= step])


def _rows_at(path: Path, step: int) -> list[dict]:
    """The validation rows logged at ``step``, as :meth:`Trainer.validate` returns them."""
    if not path.exists():
        return []
    header, rows, _ = _log_rows(path)
    out = []
    for r in rows:
        d = dict(zip(header, r, strict=True))
        if int(d["step"]) == step:
            out.append({"step": step, "subnet": d["subnet"], "accuracy": float(d["accuracy"]),
                        "loss": float(d["loss"]), "examples": int(d["examples"])})
    return out


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
        "macs": {k: setup.net.macs(c, setup.cfg.max_length) for k, c in named.items()},
        "trainable_params": {k: setup.net.trainable_params(c) for k, c in named.items()},
    }


def train(cfg: TrainConfig, *, overwrite: bool = False,
          on_step: Callable[[int, Trainer], None] | None = None) -> dict:
    """Build, then train into ``cfg.run_dir()``; returns the summary (main process)."""
    validate.writable_dir("--out", cfg.out)
    run_dir = cfg.run_dir()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise SupernetError(
                f"run directory {str(run_dir)!r} exists; use --resume to continue, --overwrite or --name"
            )
        runio.check_replaceable(run_dir, keep=[Path(cfg.model), Path(cfg.dataset)])
    return _run(cfg, run_dir, resuming=False, on_step=on_step)


def config_of_run(record: dict) -> TrainConfig:
    """The training options of a recorded run, with its groups as trained (not a groups file
    that may have changed since)."""
    cfg = TrainConfig.from_dict(record["train"])  # every option checked again: the file may be edited
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


def resume(run_dir: str | Path, max_steps: int | None = None,
           on_step: Callable[[int, Trainer], None] | None = None) -> dict:
    """Continue a run from its checkpoint with its saved configuration.

    With the same ``max_steps`` the result equals the uninterrupted run exactly, from any point
    where it stopped (before the first checkpoint too, and after the last one but before the
    final weights). A larger ``max_steps`` extends training; the cosine schedule is then
    stretched to the new length from the checkpoint on.
    """
    run_dir = Path(run_dir)
    cfg = config_of_run(runio.read_run_config(run_dir))
    if max_steps is not None:
        cfg.max_steps = max_steps
        cfg.__post_init__()
    return _run(cfg, run_dir, resuming=True, on_step=on_step)


def _run(cfg: TrainConfig, run_dir: Path, resuming: bool, on_step) -> dict:
    setup = build(cfg)  # every user error is raised here, before anything is written
    if resuming:
        check_rebuilt(setup, runio.read_run_config(run_dir), run_dir)
    trainer = Trainer(setup, run_dir, on_step=on_step)
    if resuming:
        trainer.load_checkpoint()
        done = runio.finished_at(run_dir)
        if trainer.step >= cfg.max_steps and done is not None and done >= trainer.step:
            raise SupernetError(f"run {str(run_dir)!r} already finished at step {done}; raise --max-steps")
        if trainer.step > cfg.max_steps:
            raise SupernetError(f"run {str(run_dir)!r} is at step {trainer.step}, past --max-steps {cfg.max_steps}")
    if trainer.accelerator.is_main_process:
        record = run_record(setup)
        if not resuming and run_dir.exists():
            runio.remove_run(run_dir)  # checked by check_replaceable: only what supernet wrote
        runio.mark_run(run_dir)
        runio.write_json(run_dir / runio.CONFIG, record)
    trainer.accelerator.wait_for_everyone()
    return trainer.train()
