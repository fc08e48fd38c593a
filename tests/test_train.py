"""Training: the loss falls, resume is exact, 2-process data parallel agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli

from supernet import runfiles
from supernet.errors import SupernetError
from supernet.network import SuperNetwork
from supernet.tasks import IGNORE, collate, evaluate, rows_of
from supernet.train import TrainConfig, build, resume, step_configs, train


def tiny_cfg(model_dir, csv, out, **kw):
    base = dict(model=str(model_dir), dataset=str(csv), text_column="sentence", label_column="sentiment",
                ranks=[8, 6, 4], batch_size=8, max_length=16, eval_samples=16, eval_every=50, save_every=50,
                lr=1e-2, out=str(out), max_steps=30)
    base.update(kw)
    return TrainConfig(**base)


def test_step_configs_depend_on_seed_and_step_only(tiny_bert_dir, tiny_csv, tmp_path):
    net: SuperNetwork = build(tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path)).net
    first = step_configs(net, "uniform", 0, 5)
    np.random.seed(123)
    torch.manual_seed(123)  # global RNG state plays no part
    assert step_configs(net, "uniform", 0, 5) == first
    assert any(step_configs(net, "uniform", 0, s) != first for s in range(5))  # the step matters
    assert any(step_configs(net, "uniform", s, 5) != first for s in range(1, 6))  # and so does the seed
    assert step_configs(net, "uniform", 3, 5) != step_configs(net, "uniform", 5, 3)  # (seed, step), not a sum
    sandwich = step_configs(net, "sandwich", 0, 3, k=2)
    assert len(sandwich) == 4 and sandwich[0] == net.max_config() and sandwich[1] == net.min_config()
    assert any(step_configs(net, "sandwich", s, 3, k=2)[2:] != sandwich[2:] for s in range(1, 6))


@pytest.mark.parametrize("sampler", ["uniform", "sandwich"])
def test_short_training_lowers_validation_loss(tiny_bert_dir, signal_csv, tmp_path, sampler):
    """60 steps learn a task no model can miss (the label is one frequent word), for the largest
    and the smallest sub-network alike: accuracy near perfect and the loss far below ln 2.

    Measured (seeds 0-4, both samplers, OMP_NUM_THREADS 1 and 2, identical to 3 decimals):
    validation loss 0.69 -> 0.22-0.31 at lr 5e-3, 0.37-0.46 at 3e-3, 0.07-0.13 at 1e-2, accuracy
    1.0 throughout; the required drop is 0.15. lr 2e-2 sometimes diverges: a 4x margin there too.
    """
    cfg = tiny_cfg(tiny_bert_dir, signal_csv, tmp_path, name=sampler, sampler=sampler, max_steps=60, lr=5e-3)
    before = build(cfg)
    losses_before = {}
    for sub in ("max", "min"):
        before.net.activate(before.net.space.named_config(sub))
        losses_before[sub] = evaluate(before.net.model, before.enc, "validation")["loss"]
    train(cfg)
    from supernet.commands.eval import eval_run

    for sub in ("max", "min"):
        after = eval_run(cfg.run_dir(), sub, "validation")
        assert after["accuracy"] >= 0.9, (sub, after)
        assert after["loss"] < losses_before[sub] - 0.15, (sub, losses_before[sub], after)
    log = pd.read_csv(cfg.run_dir() / "train_log.csv")
    assert list(log["step"]) == list(range(1, 61))
    assert log["loss"].iloc[-5:].mean() < log["loss"].iloc[:5].mean() - 0.15  # measured >= 0.38 (0.24 at 3e-3)
    assert set(pd.read_csv(cfg.run_dir() / "eval_log.csv")["subnet"]) == {"max", "mid", "min"}


def test_causal_lm_training_lowers_answer_loss(confident_llama_dir, signal_csv, tmp_path):
    """Causal-LM: the loss is on the answer tokens only, and 25 steps learn the decisive task.

    Measured (seeds 0-4, OMP_NUM_THREADS 1 and 2, identical to 3 decimals): answer loss 0.52 ->
    0.03-0.05 at lr 5e-3 and 1e-2, accuracy 1.0 (0.85 before: the random model already leans the
    right way on some texts); the required drop is 0.3. At 2e-2 one seed of five stops at 0.37.
    """
    cfg = tiny_cfg(confident_llama_dir, signal_csv, tmp_path, name="lm", ranks=[8, 4], max_steps=25, lr=5e-3,
                   prompt="Review: {text}\nVerdict:")
    s = build(cfg)
    assert s.task == "causal-lm" and s.label_names == ["no", "yes"]
    assert [s.tokenizer.decode(a).strip() for a in s.enc.answer_ids] == ["no", "yes"]
    rows = rows_of(s.enc.splits["train"], range(4))
    batch = collate(s.enc, rows)
    for i, r in enumerate(rows):  # the prompt, then the label's answer: loss only on the answer
        n, answer = len(r["prompt_ids"]), s.enc.answer_ids[r["labels"]]
        assert batch["input_ids"][i, : n + len(answer)].tolist() == list(r["prompt_ids"]) + answer
        assert batch["labels"][i, :n].tolist() == [IGNORE] * n
        assert batch["labels"][i, n : n + len(answer)].tolist() == answer
        assert bool((batch["labels"][i, n + len(answer) :] == IGNORE).all())
    assert {r["labels"] for r in rows} == {0, 1}
    before = evaluate(s.net.model, s.enc, "validation")["loss"]
    train(cfg)
    from supernet.commands.eval import eval_run

    for sub in ("max", "min"):
        after = eval_run(cfg.run_dir(), sub, "validation")
        assert after["accuracy"] >= 0.95, (sub, after)
        assert after["loss"] < before - 0.3, (sub, before, after)
        assert after["examples"] == len(s.enc.splits["validation"])


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
    assert not (broken.run_dir() / runfiles.ADAPTER).exists()
    assert json.loads((broken.run_dir() / "checkpoint" / "state.json").read_text())["step"] == 4
    resume(broken.run_dir())
    a = runfiles.load_tensors(full.run_dir() / runfiles.ADAPTER)
    b = runfiles.load_tensors(broken.run_dir() / runfiles.ADAPTER)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = pd.read_csv(full.run_dir() / "train_log.csv")
    log_b = pd.read_csv(broken.run_dir() / "train_log.csv")
    assert list(log_b["step"]) == list(range(1, 13))
    assert list(log_a["config"]) == list(log_b["config"])
    np.testing.assert_allclose(log_a["loss"], log_b["loss"], rtol=1e-6)


COMPRESSED = {"sparsity": 0.5, "bits": 8, "group_size": 16, "adapter_merge": "qa-sparse", "calibration_samples": 16}


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "qa-sparse"])
def test_two_process_data_parallel(tiny_bert_dir, tiny_csv, tmp_path, compressed):
    """Two CPU processes (gloo) through accelerate's launcher: same config at every step, same weights.

    accelerate's ``--cpu`` launcher spawns one process unless mpirun is set up, so the
    multi-process CPU launch goes through ``--multi_gpu`` (torch.distributed.run underneath).
    With a compressed base each process calibrates and prunes on its own: the result must be
    the one-process run's (same masks, same weights).
    """
    extra = COMPRESSED if compressed else {}
    flags = [str(x) for k, v in extra.items() for x in ("--" + k.replace("_", "-"), v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "supernet", "train", "--model", str(tiny_bert_dir), "--dataset", str(tiny_csv),
           "--text-column", "sentence", "--label-column", "sentiment", "--ranks", "8,6,4",
           "--max-steps", "8", "--batch-size", "4", "--max-length", "16", "--eval-every", "4",
           "--save-every", "4", "--eval-samples", "8", "--out", str(tmp_path), "--name", "ddp", *flags]
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
    # gradients average to the same update: a sharding or sync bug would break this. The logged
    # loss (the global batch's) and gradient norm must agree step by step (measured: <= 1e-6 and
    # 0); the weights after 8 AdamW steps differ by <= 2e-8 (measured), against a tolerance of
    # 1e-5 and the ~5e-4 (= lr) per step that a wrong shard or a missing all-reduce moves them.
    single = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="single", ranks=[8, 6, 4], max_steps=8, batch_size=8,
                      lr=5e-4, eval_every=4, save_every=4, eval_samples=8, **extra)
    train(single)
    if compressed:
        masks = "compression.safetensors"
        assert (run / masks).read_bytes() == (single.run_dir() / masks).read_bytes()
    single_log = pd.read_csv(single.run_dir() / "train_log.csv")
    assert list(log["config"]) == list(single_log["config"])
    np.testing.assert_allclose(log["loss"], single_log["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(log["grad_norm"], single_log["grad_norm"], rtol=1e-3, atol=2e-4)
    a = runfiles.load_tensors(run / runfiles.ADAPTER)
    b = runfiles.load_tensors(single.run_dir() / runfiles.ADAPTER)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_multiple_choice_causal_lm(confident_llama_dir, tmp_path):
    """Per-example answers (a list column, in another order for each example); the label is the
    right answer's text, which the question's keyword decides.

    Every answer has two tokens: a sum of token log-probabilities favours shorter answers, so
    with unequal lengths the shortest one wins before any training. Measured (seeds 0-4,
    OMP_NUM_THREADS 1 and 2, identical to 3 decimals): loss 1.04 -> 0.05-0.10 at lr 5e-3, <= 0.12 at
    1e-2, accuracy 0.4 -> 1.0; the required drop is 0.5. At 2e-2 one seed of five fails to learn.
    """
    things = {"sky": "blue sea", "grass": "green leaf", "blood": "red rose"}
    answers = list(things.values())
    rows = []
    for i in range(300):
        keyword, k = list(things)[i % 3], (i // 3) % 3
        rows.append({"question": f"{keyword} colour is", "options": answers[k:] + answers[:k],
                     "answer": things[keyword]})
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=str(confident_llama_dir), dataset=str(path), text_column="question",
                      label_column="answer", choices_column="options", ranks=[8, 4], batch_size=8, max_length=24,
                      max_steps=25, lr=5e-3, eval_samples=16, eval_every=25, save_every=25, out=str(tmp_path),
                      name="mc")
    s = build(cfg)
    assert s.label_names == ["0", "1", "2"] and set(s.enc.splits["train"]["labels"]) == {0, 1, 2}
    assert {len(a) for cs in s.enc.splits["validation"]["choice_ids"] for a in cs} == {2}
    before = evaluate(s.net.model, s.enc, "validation")["loss"]
    train(cfg)
    from supernet.commands.eval import eval_run

    after = eval_run(cfg.run_dir(), "max", "validation", predictions=tmp_path / "p.csv")
    assert after["accuracy"] >= 0.9, after
    assert after["loss"] < before - 0.5, (before, after)
    df = pd.read_csv(tmp_path / "p.csv")
    assert list(df.columns[-3:]) == ["logit_0", "logit_1", "logit_2"] and len(df) == after["examples"]
    with pytest.raises(SupernetError, match="causal-LM"):
        build(TrainConfig(model=str(confident_llama_dir), dataset=str(path), text_column="question",
                          label_column="answer", choices_column="options", task="seq-cls", out=str(tmp_path)))


def test_gradient_accumulation_matches_a_larger_batch(tiny_bert_dir, tiny_csv, tmp_path):
    """2 accumulated micro-batches of 4 == one batch of 8 (same examples, same configs).

    Compared where rounding cannot be amplified: the gradients of step 1 (same weights; measured
    difference <= 3e-8), the logged loss and gradient norm of every step (measured <= 1e-6 and 0).
    AdamW divides each coordinate by its own gradient scale, so the weights after 6 steps are
    compared loosely (measured <= 3e-6; tolerance 2e-4), still far below the ~1e-2 (= lr) a real
    accumulation bug moves them. Clipping is off so that a gradient-scale bug shows.
    """
    grads = {}

    def keep_step_one(name):
        def on_step(step, trainer):
            if step == 1:
                grads[name] = {n: p.grad.detach().clone() for n, p in trainer.net.model.named_parameters()
                               if p.grad is not None}
        return on_step

    big = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="big", batch_size=8, max_steps=6, max_length=32,
                   max_grad_norm=1e3)
    acc = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="acc", batch_size=4, grad_accum=2, max_steps=6,
                   max_length=32, max_grad_norm=1e3)
    train(big, on_step=keep_step_one("big"))
    train(acc, on_step=keep_step_one("acc"))
    assert grads["big"] and grads["big"].keys() == grads["acc"].keys()
    for k in grads["big"]:
        torch.testing.assert_close(grads["acc"][k], grads["big"][k], atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads["big"].values()) > 1e-3  # gradients of a real size
    logs = [pd.read_csv(c.run_dir() / "train_log.csv") for c in (big, acc)]
    assert list(logs[0]["config"]) == list(logs[1]["config"])
    np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logs[1]["grad_norm"], logs[0]["grad_norm"], rtol=1e-3, atol=2e-4)
    a = runfiles.load_tensors(big.run_dir() / runfiles.ADAPTER)
    b = runfiles.load_tensors(acc.run_dir() / runfiles.ADAPTER)
    init = build(big).net.trainable_state_dict()
    assert a.keys() == b.keys() == init.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=0)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 5e-3  # training moved the weights


def test_training_updates_only_the_sampled_ranks(tiny_bert_dir, tiny_csv, tmp_path):
    """The trainer trains the sampled sub-network: B starts at zero and only the active slice gets
    gradients, so after a few uniform steps (weight decay 0) the columns of B beyond the largest
    rank each group was sampled at (train_log.csv) are still exactly zero and the rows of A there
    untouched, while every column up to it has moved."""
    cfg = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="slices", ranks=[8, 6, 4, 2], max_steps=3,
                   sampler="uniform", weight_decay=0.0)
    fresh = build(cfg)  # the same seed builds the run's initial weights
    init = fresh.net.trainable_state_dict()
    assert all(float(init[f"{n}.lora_B"].abs().max()) == 0 for n in fresh.net.adapters)
    train(cfg)
    configs = [json.loads(c) for c in pd.read_csv(cfg.run_dir() / "train_log.csv")["config"]]
    assert len(configs) == 3
    trained = runfiles.load_tensors(cfg.run_dir() / runfiles.ADAPTER)
    below_max = 0
    for group, names in fresh.net.groups.items():
        top = max(c[group] for c in configs)
        below_max += top < 8
        for n in names:
            b, a = trained[f"{n}.lora_B"], trained[f"{n}.lora_A"]
            assert bool((b[:, top:] == 0).all()), (n, top)
            assert torch.equal(a[top:], init[f"{n}.lora_A"][top:]), (n, top)
            assert bool((b[:, :top] != 0).any(dim=0).all()), (n, top)
    assert below_max >= 2  # some groups never ran at full rank, so the check has teeth


def test_distill_loss_is_kl_on_the_scored_positions():
    from supernet.train import distill_loss

    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    manual = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(distill_loss(s, t, None), manual, atol=1e-6)
    assert float(distill_loss(t, t, None)) == pytest.approx(0.0, abs=1e-7)
    # causal LM: only the positions that predict an answer token (labels shifted by one)
    s3, t3 = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, -100, 3, 4]])
    expected = distill_loss(s3[0, 2:4], t3[0, 2:4], None)
    assert torch.allclose(distill_loss(s3, t3, labels), expected, atol=1e-6)
    t3[0, 0] += 5.0  # a position outside the answer changes nothing
    assert torch.allclose(distill_loss(s3, t3, labels), expected, atol=1e-6)


def test_inplace_distillation_trains_the_smaller_subnetworks_from_the_largest(capsys, tiny_train_args):
    args = [*tiny_train_args, "--sampler", "sandwich", "--name", "d"]
    code, _, err = cli(capsys, "train", *args, "--distill", "inplace")
    assert code == 0, err
    run = Path(tiny_train_args[tiny_train_args.index("--out") + 1]) / "d"
    distilled = pd.read_csv(run / "train_log.csv")["loss"]
    code, _, err = cli(capsys, "train", *args, "--overwrite")
    assert code == 0, err
    plain = pd.read_csv(run / "train_log.csv")["loss"]
    assert distilled.notna().all() and not np.allclose(distilled, plain)  # another loss reached the adapters
    # the teacher learns the labels: the largest trains on them, so the step loss is far from 0
    assert (distilled > 0.05 * plain).all()


def test_inplace_distillation_without_a_teacher_that_learns_is_refused(capsys, tiny_train_args, tmp_path):
    """Uniform sampling almost never draws the largest sub-network, so the teacher would stay
    untrained and every loss would be a KL between untrained networks (about 0)."""
    code, _, err = cli(capsys, "train", *tiny_train_args, "--name", "u", "--distill", "inplace")
    assert_refused(code, err, "--distill inplace needs --sampler sandwich")
    assert not (Path(tiny_train_args[tiny_train_args.index("--out") + 1]) / "u").exists()
