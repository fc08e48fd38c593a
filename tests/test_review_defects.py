"""Defects found in review: fp16 from the environment, the learning rate of an extended run,
MOREA's tie-break."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli
from test_train import tiny_cfg

from supernet import runfiles as runio
from supernet.space import SearchSpace
from supernet.train import resume, train


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def on_step(s, trainer):
        if s == step:
            raise Crash

    return on_step


def run_files(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ 1. fp16
def test_fp16_from_accelerate_is_refused_before_anything_is_written(capsys, monkeypatch, tiny_train_args, tmp_path):
    """``accelerate launch --mixed_precision fp16`` (or an accelerate config saying fp16) reaches the
    trainer as ACCELERATE_MIXED_PRECISION=fp16 under ``--mixed-precision auto``. Training does not
    drive a GradScaler (its optimizer steps are not accelerate's), so fp16 would apply scaled and
    overflowing steps: it is refused in one line, before a run directory is made or touched."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "auto", "--max-steps", "2")
    assert code == 0, err
    run = tmp_path / "runs" / "auto"
    before = run_files(run)

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "fp16")
    assert_refused(code, err, "fp16")
    assert not (tmp_path / "runs" / "fp16").exists()
    # resuming a run trained with auto precision under fp16: refused, the run untouched
    code, _, err = cli(capsys, "train", "--resume", run, "--max-steps", "4")
    assert_refused(code, err, "fp16")
    assert run_files(run) == before
    # an explicit --mixed-precision wins over the environment, as in accelerate
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "fp32", "--mixed-precision", "no",
                       "--max-steps", "2")
    assert code == 0, err


# ------------------------------------------------------------------------------------ 2. extension
def test_schedule_stretch_is_continuous_and_ends_at_zero():
    from supernet.train import Schedule

    base = Schedule(warmup=4, steps=16)
    assert base(0) == 0.0 and base(4) == 1.0 and base(16) == 0.0
    # interrupted at 8 (after the warmup), extended to 32
    s = base.stretched(8, 32)
    assert [s(t) for t in range(9)] == [base(t) for t in range(9)]
    assert s(32) == 0.0
    values = [s(t) for t in range(8, 33)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert max(a - b for a, b in zip(values, values[1:], strict=False)) < 0.1 * base(8)
    # interrupted inside the warmup (at 2): the warmup runs to its end, then the cosine to the new end
    w = base.stretched(2, 40)
    assert [w(t) for t in range(5)] == [base(t) for t in range(5)] and w(4) == 1.0 and w(40) == 0.0
    # a stretch of a stretched schedule, and the JSON round trip a checkpoint stores
    again = s.stretched(20, 50)
    assert [again(t) for t in range(21)] == [s(t) for t in range(21)] and again(50) == 0.0
    assert Schedule.from_json(json.loads(json.dumps(again.to_json()))) == again
    assert again.end == 50 and base.end == 16
    # a finished run (rate 0 at its end) stays at 0: the schedule is continuous
    assert base.stretched(16, 24)(20) == 0.0


def test_extension_continues_the_learning_rate(tiny_bert_dir, tiny_csv, tmp_path):
    """``--resume RUN --max-steps N`` stretches the cosine from the checkpoint: the rate the first
    new step uses is the one the run would have used there, it then falls steadily (no jump back
    up) and reaches 0 at N. An extension interrupted and resumed again, after or before its first
    checkpoint, ends with exactly the weights of the uninterrupted extension."""
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="a", max_steps=16, save_every=4, warmup_ratio=0.25)
    with pytest.raises(Crash):
        train(cfg, on_step=crash_at(10))  # the checkpoint is at step 8
    a = cfg.run_dir()
    planned = pd.read_csv(a / "train_log.csv", dtype={"lr": str})  # steps 1-10 of the planned 16
    for name in ("b", "c"):
        shutil.copytree(a, tmp_path / name)
    state = json.loads((a / runio.CHECKPOINT / "state.json").read_text())
    assert state["step"] == 8

    resume(a, max_steps=32)
    log = pd.read_csv(a / "train_log.csv")
    assert list(log["step"]) == list(range(1, 33))
    lr = log["lr"].to_numpy()  # lr[i]: the rate step i + 1 used
    s0, warmup = 8, 4
    # step s0 + 1 uses the rate the run was at: its value in the planned schedule
    assert pd.read_csv(a / "train_log.csv", dtype={"lr": str})["lr"][s0] == planned["lr"][s0]
    after = lr[warmup:]
    assert np.all(np.diff(after) <= 0), lr  # no jump back up after the warmup
    assert np.max(np.abs(np.diff(lr[s0:]))) < 0.1 * lr[s0], lr  # smooth from the checkpoint on
    assert lr[-1] < 0.01 * lr[s0]
    ckpt = torch.load(a / runio.CHECKPOINT / "optimizer.pt", weights_only=True)
    assert ckpt["scheduler"]["_last_lr"][0] == 0.0  # 0 at the new end
    assert json.loads((a / runio.CHECKPOINT / "state.json").read_text())["schedule"]["stretches"] == [[8, 32]]

    # interrupted after the extension's first checkpoint (12), then resumed with the recorded length
    with pytest.raises(Crash):
        resume(tmp_path / "b", max_steps=32, on_step=crash_at(14))
    assert json.loads((tmp_path / "b" / runio.CHECKPOINT / "state.json").read_text())["step"] == 12
    resume(tmp_path / "b")
    # interrupted before it (the checkpoint is still the one at 8, config.json already says 32)
    with pytest.raises(Crash):
        resume(tmp_path / "c", max_steps=32, on_step=crash_at(10))
    assert json.loads((tmp_path / "c" / runio.CHECKPOINT / "state.json").read_text())["step"] == 8
    resume(tmp_path / "c")

    want = runio.load_tensors(a / runio.ADAPTER)
    for name in ("b", "c"):
        got = runio.load_tensors(tmp_path / name / runio.ADAPTER)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        other = pd.read_csv(tmp_path / name / "train_log.csv")
        assert list(other["lr"]) == list(log["lr"]) and list(other["config"]) == list(log["config"])


def test_checkpoint_without_a_recorded_schedule_resumes_exactly(tiny_bert_dir, tiny_csv, tmp_path):
    """A checkpoint written before the schedule was recorded in state.json resumes on the cosine of
    the run's recorded --max-steps, as it was trained: the result is the uninterrupted run's."""
    full = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="full", max_steps=12, save_every=4, warmup_ratio=0.25)
    train(full)
    old = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="old", max_steps=12, save_every=4, warmup_ratio=0.25)
    with pytest.raises(Crash):
        train(old, on_step=crash_at(6))
    state_path = old.run_dir() / runio.CHECKPOINT / "state.json"
    state = json.loads(state_path.read_text())
    state.pop("schedule", None)
    state_path.write_text(json.dumps(state))
    resume(old.run_dir())
    a = runio.load_tensors(full.run_dir() / runio.ADAPTER)
    b = runio.load_tensors(old.run_dir() / runio.ADAPTER)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------ 3. MOREA
class _RecordingRng:
    """A numpy Generator that records what ``choice`` drew (MOREA's tournament picks)."""

    def __init__(self, rng: np.random.Generator, drawn: list):
        self._rng, self._drawn = rng, drawn

    def choice(self, *args, **kwargs):
        out = self._rng.choice(*args, **kwargs)
        self._drawn.append([int(i) for i in np.atleast_1d(out)])
        return out

    def __getattr__(self, name):
        return getattr(self._rng, name)


@pytest.mark.parametrize("landscape", ["flat", "terraced"])
def test_morea_breaks_rank_ties_by_age(tmp_path, monkeypatch, landscape):
    """Each child's parent is the tournament's best by non-domination rank, and among equal ranks
    the oldest (first into the queue), whatever order the tournament was drawn in. Checked on the
    first bred generation, whose queue is the first generation in evaluation order: ``flat`` ties
    everyone, ``terraced`` gives three accuracy levels (ties within each)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    from supernet.search import SearchSettings, run_search
    from supernet.search.encoding import Encoding

    space = SearchSpace({f"L{i}.qkv": [32, 24, 16] for i in range(5)})
    population = 12  # tournaments of 3

    def evaluate(config):
        accuracy = 0.5 if landscape == "flat" else 0.5 + 0.1 * [16, 24, 32].index(config["L0.qkv"])
        return {"accuracy": accuracy, "loss": 1 - accuracy}

    drawn: list[list[int]] = []
    parents: list[dict] = []
    real_rng, real_encode = np.random.default_rng, Encoding.encode
    monkeypatch.setattr(np.random, "default_rng", lambda *a, **k: _RecordingRng(real_rng(*a, **k), drawn))

    def encode(self, config):
        parents.append(dict(config))
        return real_encode(self, config)

    monkeypatch.setattr(Encoding, "encode", encode)
    settings = SearchSettings(algorithm="morea", population=population, evaluations=2 * population, seed=4)
    result = run_search(space, evaluate, lambda c: {"macs": 1.0, "params": 1.0}, tmp_path / "s", settings)
    monkeypatch.undo()

    history = result.history.sort_values("index")
    queue = history[history["generation"] == 1]
    assert len(queue) == population
    configs = [json.loads(c) for c in queue["config"]]
    F = queue[result.objective_columns].to_numpy(dtype=float)
    assert len(drawn) >= population and len(parents) >= population
    later_drawn_first = 0
    for picks, parent in zip(drawn[:population], parents[:population], strict=True):
        ranks = NonDominatedSorting().do(F[picks], return_rank=True)[1]
        best = min(p for p, r in zip(picks, ranks, strict=True) if r == ranks.min())
        assert parent == configs[best], (picks, ranks)
        tied = [p for p, r in zip(picks, ranks, strict=True) if r == ranks.min()]
        later_drawn_first += tied[0] != min(tied)
    assert later_drawn_first > 0  # draw order and age disagree somewhere: the check has teeth

    # still one search per seed
    again = run_search(space, evaluate, lambda c: {"macs": 1.0, "params": 1.0}, tmp_path / "t", settings)
    assert again.history["config"].tolist() == result.history["config"].tolist()
