"""Training: the loss falls, resume is exact, 2-process data parallel agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from supernet import run as runio
from supernet.errors import SupernetError
from supernet.network import SuperNetwork
from supernet.tasks import evaluate
from supernet.train import TrainConfig, build, resume, step_configs, train


def tiny_cfg(model_dir, csv, out, **kw):
    base = dict(model=str(model_dir), dataset=str(csv), text_column="sentence", label_column="sentiment",
                ranks=[8, 6, 4], batch_size=8, max_length=16, eval_samples=16, eval_every=50, save_every=50,
                lr=1e-2, out=str(out), max_steps=30)
    base.update(kw)
    return TrainConfig(**base)


def test_step_configs_depend_on_seed_and_step_only(tiny_bert_dir, tiny_csv, tmp_path):
    net: SuperNetwork = build(tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path)).net
    assert step_configs(net, "uniform", 0, 5) == step_configs(net, "uniform", 0, 5)
    assert any(step_configs(net, "uniform", 0, s) != step_configs(net, "uniform", 0, 5) for s in range(5))
    sandwich = step_configs(net, "sandwich", 0, 3, k=2)
    assert len(sandwich) == 4 and sandwich[0] == net.max_config() and sandwich[1] == net.min_config()


@pytest.mark.parametrize("sampler", ["uniform", "sandwich"])
def test_short_training_lowers_validation_loss(tiny_bert_dir, tiny_csv, tmp_path, sampler):
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name=sampler, sampler=sampler, max_steps=60)
    before = build(cfg)
    losses_before = {}
    for sub in ("max", "min"):
        before.net.activate(before.net.space.named_config(sub))
        losses_before[sub] = evaluate(before.net.model, before.enc, "validation")["loss"]
    train(cfg)
    from supernet.evaluate import eval_run

    for sub in ("max", "min"):
        after = eval_run(cfg.run_dir(), sub, "validation")
        assert after["loss"] < losses_before[sub] - 0.05, (sub, losses_before[sub], after)
    log = pd.read_csv(cfg.run_dir() / "train_log.csv")
    assert list(log["step"]) == list(range(1, 61))
    assert log["loss"].iloc[-5:].mean() < log["loss"].iloc[:5].mean()
    assert set(pd.read_csv(cfg.run_dir() / "eval_log.csv")["subnet"]) == {"max", "mid", "min"}


def test_causal_lm_training_lowers_answer_loss(tiny_llama_dir, tiny_csv, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tiny_csv, tmp_path, name="lm", ranks=[8, 4], max_steps=25,
                   prompt="Review: {text}\nVerdict:")
    s = build(cfg)
    assert s.task == "causal-lm"
    batch = next(iter([s.enc.splits["train"][i] for i in range(1)]))
    assert "prompt_ids" in batch
    before = evaluate(s.net.model, s.enc, "validation")["loss"]
    train(cfg)
    from supernet.evaluate import eval_run

    after = eval_run(cfg.run_dir(), "max", "validation")
    assert after["loss"] < before
    assert 0.0 <= after["accuracy"] <= 1.0 and after["examples"] == len(s.enc.splits["validation"])


class Crash(RuntimeError):
    pass


def test_resume_matches_uninterrupted(tiny_bert_dir, tiny_csv, tmp_path):
    full = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="full", max_steps=12, save_every=4,
                    dropout=0.1, sampler="sandwich")
    train(full)
    broken = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="broken", max_steps=12, save_every=4,
                      dropout=0.1, sampler="sandwich")

    def crash(step, trainer):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(broken, on_step=crash)
    assert not (broken.run_dir() / runio.ADAPTER).exists()
    assert json.loads((broken.run_dir() / "checkpoint" / "state.json").read_text())["step"] == 4
    resume(broken.run_dir())
    a = runio.load_tensors(full.run_dir() / runio.ADAPTER)
    b = runio.load_tensors(broken.run_dir() / runio.ADAPTER)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = pd.read_csv(full.run_dir() / "train_log.csv")
    log_b = pd.read_csv(broken.run_dir() / "train_log.csv")
    assert list(log_b["step"]) == list(range(1, 13))
    assert list(log_a["config"]) == list(log_b["config"])
    np.testing.assert_allclose(log_a["loss"], log_b["loss"], rtol=1e-6)


def test_two_process_data_parallel(tiny_bert_dir, tiny_csv, tmp_path):
    """Two CPU processes (gloo) through accelerate's launcher: same config at every step, same weights.

    accelerate's ``--cpu`` launcher spawns one process unless mpirun is set up, so the
    multi-process CPU launch goes through ``--multi_gpu`` (torch.distributed.run underneath).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "supernet", "train", "--model", str(tiny_bert_dir), "--dataset", str(tiny_csv),
           "--text-column", "sentence", "--label-column", "sentiment", "--ranks", "8,6,4",
           "--max-steps", "8", "--batch-size", "4", "--max-length", "16", "--eval-every", "4",
           "--save-every", "4", "--eval-samples", "8", "--out", str(tmp_path), "--name", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    traces = []
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run / f"process{rank}.jsonl").read_text().splitlines()]
        traces.append(lines)
    steps = [[(r["step"], r["configs"]) for r in t if "configs" in r] for t in traces]
    assert len(steps[0]) == 8 and steps[0] == steps[1]
    assert len({c for _, cs in steps[0] for c in cs}) > 1  # configurations really vary by step
    finals = [[r["weights"] for r in t if "weights" in r] for t in traces]
    assert finals[0] == finals[1] and len(finals[0]) == 1
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == list(range(1, 9))
    # Two processes of 4 see, between them, exactly the 8 examples one process of 8 sees, so
    # gradients average to the same update: a sharding or sync bug would break this.
    single = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="single", ranks=[8, 6, 4], max_steps=8, batch_size=8,
                      lr=5e-4, eval_every=4, save_every=4, eval_samples=8)
    train(single)
    a = runio.load_tensors(run / runio.ADAPTER)
    b = runio.load_tensors(single.run_dir() / runio.ADAPTER)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_multiple_choice_causal_lm(tiny_llama_dir, tmp_path):
    """Per-example answers (a list column); the label is the right answer's text."""
    rows = []
    for i in range(120):
        a, b = i % 7, i % 5
        choices = [f"{a + b} apples", f"{a + b + 1} pears", f"{a + b + 2} plums"]
        right = choices[0]
        k = i % 3
        rows.append({"question": f"{a} plus {b} is", "options": choices[k:] + choices[:k], "answer": right})
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=str(tiny_llama_dir), dataset=str(path), text_column="question", label_column="answer",
                      choices_column="options", ranks=[8, 4], batch_size=8, max_length=24, max_steps=25,
                      lr=1e-2, eval_samples=16, eval_every=25, save_every=25, out=str(tmp_path), name="mc")
    s = build(cfg)
    assert s.label_names == ["0", "1", "2"] and set(s.enc.splits["train"]["labels"]) == {0, 1, 2}
    before = evaluate(s.net.model, s.enc, "validation")["loss"]
    train(cfg)
    from supernet.evaluate import eval_run

    after = eval_run(cfg.run_dir(), "max", "validation", predictions=tmp_path / "p.csv")
    assert after["loss"] < before
    df = pd.read_csv(tmp_path / "p.csv")
    assert list(df.columns[-3:]) == ["logit_0", "logit_1", "logit_2"] and len(df) == after["examples"]
    with pytest.raises(SupernetError, match="causal-LM"):
        build(TrainConfig(model=str(tiny_llama_dir), dataset=str(path), text_column="question",
                          label_column="answer", choices_column="options", task="seq-cls", out=str(tmp_path)))


def test_gradient_accumulation_matches_a_larger_batch(tiny_bert_dir, tiny_csv, tmp_path):
    """4 x 2 accumulated micro-batches == one batch of 8 (same examples, same configs)."""
    big = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="big", batch_size=8, max_steps=6, max_length=32)
    acc = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="acc", batch_size=4, grad_accum=2, max_steps=6,
                   max_length=32)
    train(big)
    train(acc)
    a = runio.load_tensors(big.run_dir() / runio.ADAPTER)
    b = runio.load_tensors(acc.run_dir() / runio.ADAPTER)
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
        moved += float((a[k] - build(big).net.trainable_state_dict()[k]).abs().sum()) if k.endswith("lora_B") else 0
    assert moved > 0  # training changed the weights, so the comparison means something
