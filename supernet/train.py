"""NLS training: one sub-adapter configuration per optimizer step, through ``accelerate``.

Every process derives a step's configuration from ``(seed, step)`` alone, so under
``accelerate launch`` all processes train the same sub-network at the same step; data order
is a permutation drawn from ``(seed, epoch)``, sharded by process. A run resumed from its
checkpoint reproduces the uninterrupted run exactly (weights, optimizer, scheduler, RNG).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from supernet import runfiles as runio
from supernet import validate
from supernet.errors import SupernetError
from supernet.loader import (  # noqa: F401  (TrainConfig, Setup, build: re-exported for users of train)
    SAMPLERS,
    Setup,
    TrainConfig,
    build,
    check_rebuilt,
    config_of_run,
    run_record,
)
from supernet.network import SuperNetwork
from supernet.schedule import Schedule, mixed_precision
from supernet.space import Config
from supernet.tasks import BatchOrder, collate, evaluate, rows_of
from supernet.train_logs import _CsvAppender, _rows_at, _truncate_log


def step_configs(net: SuperNetwork, sampler: str, seed: int, step: int, k: int = 2) -> list[Config]:
    """The sub-networks trained at ``step``: a function of ``(seed, step)`` only.

    ``uniform``: one configuration drawn uniformly (Shears / NNCF NLS). ``sandwich``: the
    largest, the smallest and ``k`` random ones, their gradients accumulated.
    """
    rng = np.random.default_rng([seed, step])
    if sampler == "uniform":
        return [net.sample(rng)]
    return [net.max_config(), net.min_config()] + [net.sample(rng) for _ in range(k)]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """In-place distillation (BigNAS, Yu et al. 2020): ``KL(teacher || student)`` of the output
    distributions, where the task scores them: every example's class logits (sequence
    classification), or the positions that predict an answer token (causal LM: logits at ``t``
    predict ``labels[t + 1]``, ``-100`` ignored). The teacher is the largest sub-network, detached."""
    if student.dim() == 3:
        keep = labels[:, 1:] != -100
        student, teacher = student[:, :-1][keep], teacher[:, :-1][keep]
    log_p = torch.log_softmax(student.float(), dim=-1)
    log_q = torch.log_softmax(teacher.detach().float(), dim=-1)
    return torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


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
        mp = mixed_precision(self.cfg)
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: gloo on CPU.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        _warn_single_cpu_launch()
        # The frozen bases' buffers (masks, integers, pre-quantisation weights) are equal on every
        # process by construction and never change: broadcasting them before each forward, DDP's
        # default, would send a model's worth of data per step.
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=distributed and not torch.cuda.is_available(),
                                       kwargs_handlers=[ddp])
        self.net = setup.net
        # a stand-alone network: one configuration every step (checked against the space)
        self.fixed = self.net.space.validate(self.cfg.fixed) if self.cfg.fixed is not None else None
        self.params = [p for p in self.net.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.schedule = Schedule.cosine(self.cfg)
        # through self.schedule, which load_checkpoint replaces: a lambda, whose state LambdaLR does not save
        self.scheduler = LambdaLR(self.optimizer, lambda step: self.schedule(step))
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
            runio.write_json(tmp / "state.json", {"step": self.step, "processes": acc.num_processes,
                                                  "schedule": self.schedule.to_json()})
            runio.swap_dir(tmp, final)
        acc.wait_for_everyone()

    def load_checkpoint(self, planned_steps: int | None = None) -> None:
        """Load the newest complete checkpoint; with none yet (stopped before the first one), start at 0.

        The learning-rate schedule is the checkpoint's, stretched from its step when
        ``cfg.max_steps`` asks for another length (:class:`Schedule`). ``planned_steps``: the
        ``max_steps`` the run was recorded with, the schedule of a checkpoint from before
        schedules were saved (default ``cfg.max_steps``).
        """
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
            # a checkpoint from before schedules were saved ran the cosine of the recorded length
            schedule = (Schedule.from_json(state["schedule"]) if "schedule" in state
                        else Schedule.cosine(self.cfg, planned_steps))
        except Exception as e:  # a truncated or foreign file: many error types, one message
            raise SupernetError(f"checkpoint of {str(self.run_dir)!r} is corrupt: {type(e).__name__}") from None
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step = step
        self.schedule = schedule
        if schedule.end != self.cfg.max_steps and self.cfg.max_steps > step:
            self.schedule = schedule.stretched(step, self.cfg.max_steps)
            if self.schedule(step) == 0 and self.accelerator.is_main_process:
                print(f"supernet: note: run {str(self.run_dir)!r} finished its learning-rate schedule at step {step} "
                      "(rate 0); the extension continues it at rate 0, so its steps leave the weights unchanged",
                      file=sys.stderr)

    # ---------------------------------------------------------------- evaluation
    def validate(self) -> list[dict]:
        rows = []
        named = {"fixed": self.fixed} if self.fixed is not None else {
            name: self.net.space.named_config(name) for name in ("max", "mid", "min")}
        for name, config in named.items():
            self.net.activate(config)
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
            configs = [self.fixed] if self.fixed is not None else step_configs(
                self.net, cfg.sampler, cfg.seed, self.step, cfg.sandwich_random)
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            n_back = cfg.grad_accum * len(configs)
            k = 0
            active = []  # what the layers really ran, for the per-process trace
            largest = self.net.max_config()
            for micro in range(cfg.grad_accum):
                batch = self.micro_batch(self.step * cfg.grad_accum + micro)
                teacher = None
                if cfg.distill == "inplace" and configs[0] != largest:  # sandwich trains max first
                    self.net.activate(largest)
                    with torch.no_grad():
                        teacher = self.model(**batch).logits
                for config in configs:
                    self.net.activate(config)
                    if trace is not None:
                        active.append(config_digest(self.net.active_config()))
                    k += 1
                    sync = contextlib.nullcontext() if k == n_back else acc.no_sync(self.model)
                    with sync:
                        out = self.model(**batch)
                        if teacher is not None and config != largest:
                            loss = distill_loss(out.logits, teacher, batch.get("labels")) / n_back
                        else:
                            loss = out.loss / n_back
                            if cfg.distill == "inplace":
                                teacher = out.logits.detach()
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


def check_distill(cfg: TrainConfig) -> None:
    """In-place distillation needs a teacher that learns: the sandwich rule trains the largest
    sub-network on the labels every step. With uniform sampling the largest is almost never drawn,
    so every sub-network would learn an untrained network's outputs (all losses near 0)."""
    if cfg.distill == "inplace" and cfg.fixed is not None:
        raise SupernetError("--distill inplace trains a super-network, not one fixed configuration")
    if cfg.distill == "inplace" and cfg.sampler != "sandwich":
        raise SupernetError("--distill inplace needs --sampler sandwich: the largest sub-network must learn the "
                            "labels every step to teach the others")


def train(cfg: TrainConfig, *, overwrite: bool = False,
          on_step: Callable[[int, Trainer], None] | None = None) -> dict:
    """Build, then train into ``cfg.run_dir()``; returns the summary (main process)."""
    check_distill(cfg)
    validate.writable_dir("--out", cfg.out)
    run_dir = cfg.run_dir()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise SupernetError(
                f"run directory {str(run_dir)!r} exists; use --resume to continue, --overwrite or --name"
            )
        runio.check_replaceable(run_dir, keep=[Path(cfg.model), Path(cfg.dataset)])
    return _run(cfg, run_dir, resuming=False, on_step=on_step)


def resume(run_dir: str | Path, max_steps: int | None = None,
           on_step: Callable[[int, Trainer], None] | None = None) -> dict:
    """Continue a run from its checkpoint with its saved configuration.

    With the same ``max_steps`` the result equals the uninterrupted run exactly, from any point
    where it stopped (before the first checkpoint too, and after the last one but before the
    final weights). A larger ``max_steps`` extends training; the cosine schedule is then
    stretched to the new length from the checkpoint on, continuously: from the rate the run is
    at there to 0 at the new end (:class:`Schedule`; the checkpoints record it, so an extension
    resumed again is exact too). A finished run is at rate 0, so extending it trains at 0.
    """
    run_dir = Path(run_dir)
    cfg = config_of_run(runio.read_run_config(run_dir))
    check_distill(cfg)
    planned = cfg.max_steps
    if max_steps is not None:
        cfg.max_steps = max_steps
        cfg.__post_init__()
    return _run(cfg, run_dir, resuming=True, on_step=on_step, planned_steps=planned)


def _run(cfg: TrainConfig, run_dir: Path, resuming: bool, on_step, planned_steps: int | None = None) -> dict:
    # every user error is raised here, before anything is written
    mixed_precision(cfg)
    setup = build(cfg, run_dir=run_dir if resuming else None, progress=True)
    if resuming:
        check_rebuilt(setup, runio.read_run_config(run_dir), run_dir)
    trainer = Trainer(setup, run_dir, on_step=on_step)
    if resuming:
        trainer.load_checkpoint(planned_steps)
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
        if not resuming:
            setup.save_masks(run_dir)  # before config.json: a run with a config has its masks
        runio.write_json(run_dir / runio.CONFIG, record)
    trainer.accelerator.wait_for_everyone()
    return trainer.train()
