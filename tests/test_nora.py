"""NoRA (nested LoRA from an activation-aware SVD) and the calibration statistics behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_refused, cli, tiny_bert_config
from torch import nn
from transformers import BertForSequenceClassification

from supernet.adapters import ElasticNoRA, adapter_kind
from supernet.compress.calibration import LayerStats, layer_statistics
from supernet.compress.subspace import awsvd, awsvd_bound, normalised_scales


# ----------------------------------------------------------------------------- AwSVD
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_awsvd_error_obeys_its_bound_on_random_matrices(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for trial in range(5):
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        scale = torch.exp(torch.randn(shape[1], generator=g, dtype=torch.float64) * (trial + 1))  # outliers
        for rank in (1, 4, 12, min(shape) - 1):
            b0, a0 = awsvd(w, scale, rank)
            assert b0.shape == (shape[0], rank) and a0.shape == (rank, shape[1])
            error = torch.linalg.matrix_norm(w - b0 @ a0, ord=2)
            s = normalised_scales(scale)
            sigma = torch.linalg.svdvals(w * s)
            assert awsvd_bound(w, scale, rank) == pytest.approx(float(sigma[rank] * s.max() / s.min()))
            assert error <= awsvd_bound(w, scale, rank) * (1 + 1e-9)
            # the bound is not vacuous: the error is at least the plain (unweighted) optimum
            assert error >= torch.linalg.svdvals(w)[rank] * (1 - 1e-9)
        b0, a0 = awsvd(w, scale, min(shape))
        torch.testing.assert_close(b0 @ a0, w)  # exact at full rank


def test_awsvd_favours_the_active_features():
    """With one input feature 100x as active, the rank-1 factor keeps that column almost exactly."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, generator=g, dtype=torch.float64)
    scale = torch.ones(8, dtype=torch.float64)
    scale[3] = 100.0
    b0, a0 = awsvd(w, scale, 1)
    assert (w - b0 @ a0)[:, 3].norm() < 0.02 * w[:, 3].norm()


# ----------------------------------------------------------------------------- statistics
def _tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(5, 100, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0  # padding: left out of every sum
        mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])})
    return out


def test_layer_statistics_equal_the_explicit_sums():
    model = _tiny_bert()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    layers = {n: model.get_submodule(n) for n in names}
    stats = layer_statistics(model, layers, _batches(), ("input_sq_norms", "input_cov", "grad_cov"))

    xs = {n: [] for n in names}
    gs = {n: [] for n in names}
    for b in _batches():  # the reference: inputs kept, output gradients by autograd.grad
        outs = {}

        def keep(m, i, o, n, b=b, outs=outs):
            xs[n].append((i[0].detach(), b["attention_mask"]))
            outs[n] = o

        hooks = [layers[n].register_forward_hook(lambda m, i, o, n=n: keep(m, i, o, n)) for n in names]
        for p in model.parameters():
            p.requires_grad_(True)
        loss = model(**b).loss
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        for h in hooks:
            h.remove()
        for n, grad in zip(names, grads, strict=True):
            gs[n].append((grad, b["attention_mask"]))
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1])[m.reshape(-1).bool()] for t, m in xs[n]]).double()
        gr = torch.cat([t.reshape(-1, t.shape[-1])[m.reshape(-1).bool()] for t, m in gs[n]]).double()
        s = stats[n]
        assert s.tokens == x.shape[0] == 2 * (21 - 2 - 4)
        torch.testing.assert_close(s.input_sq_norms, x.pow(2).sum(0))
        torch.testing.assert_close(s.input_cov, x.T @ x)
        torch.testing.assert_close(s.grad_cov, gr.T @ gr)
        assert s.grad_cov.abs().max() > 0
        torch.testing.assert_close(s.input_scale(), (x.pow(2).mean(0)).sqrt())


def test_layer_statistics_leave_the_model_as_it_was():
    model = _tiny_bert()
    layer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    model.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    model.train()
    layer_statistics(model, {"l": layer}, _batches(), ("grad_cov",))
    assert model.training
    assert not layer.weight.requires_grad and model.classifier.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the kind
def _nora(in_f=24, out_f=20, outer=10, ranks=6, scaling="lora", merge="plain", seed=0):
    torch.manual_seed(seed)
    ad = ElasticNoRA(nn.Linear(in_f, out_f), outer, ranks, alpha=12.0, scaling=scaling, merge=merge)
    x = torch.randn(50, in_f) * torch.linspace(0.1, 3.0, in_f)
    ad.calibrate(LayerStats(50, input_sq_norms=x.double().pow(2).sum(0)))
    with torch.no_grad():
        ad.inner_B.normal_(std=0.5)  # zero at init: randomised so that the tests can fail
    return ad


def test_the_outer_pair_is_the_activation_aware_svd_of_the_frozen_weight():
    torch.manual_seed(0)
    ad = ElasticNoRA(nn.Linear(24, 20), 10, 6)
    x = torch.randn(50, 24) * torch.linspace(0.1, 3.0, 24)
    stats = LayerStats(50, input_sq_norms=x.double().pow(2).sum(0))
    ad.calibrate(stats)
    b0, a0 = awsvd(ad.base.weight().detach(), x.pow(2).mean(0).sqrt(), 10)
    torch.testing.assert_close(ad.outer_B, b0.float())
    torch.testing.assert_close(ad.outer_A, a0.float())
    assert ad.delta_weight().abs().max() == 0  # B' starts at zero: the super-network starts as the base


@pytest.mark.parametrize("scaling", ["lora", "rora", "fixed"])
@pytest.mark.parametrize("rank", [6, 3])
def test_nora_delta_is_the_explicit_nested_product(scaling, rank):
    ad = _nora(scaling=scaling)
    ad.set_active(rank)
    s = {"lora": 12.0 / rank, "rora": 12.0 / rank ** 0.5, "fixed": 12.0 / 6}[scaling]
    explicit = s * ad.outer_B @ ad.inner_B[:, :rank] @ ad.inner_A[:rank] @ ad.outer_A
    torch.testing.assert_close(ad.delta_weight(), explicit)
    assert ad.delta_weight().abs().max() > 1e-3
    x = torch.randn(4, 24)
    torch.testing.assert_close(ad(x), ad.base(x) + x @ explicit.T, atol=1e-5, rtol=1e-5)
    f = ad.lora_factors()  # the PEFT fold: a rank-r LoRA pair with the same update
    assert f.lora_A.shape == (rank, 24) and f.lora_B.shape == (20, rank)
    torch.testing.assert_close(f.scale * f.lora_B @ f.lora_A, explicit)
    peft_scale = f.alpha / (rank ** 0.5 if f.rslora else rank)
    assert peft_scale == pytest.approx(s)
    assert ad.adapter_params() == 2 * 10 * rank and ad.shipped_params() == rank * (24 + 20)


def test_only_the_inner_pair_trains():
    ad = _nora()
    assert {n for n, p in ad.named_parameters() if p.requires_grad} == {"inner_A", "inner_B"}
    assert set(ad.frozen_state()) == {"outer_A", "outer_B"}
    ad(torch.randn(3, 24)).sum().backward()
    assert ad.inner_A.grad is not None and ad.inner_B.grad is not None


def test_nora_through_a_pruned_base_keeps_its_zeros():
    from supernet.bases import MaskedBase

    torch.manual_seed(0)
    layer = nn.Linear(24, 20)
    mask = torch.rand(20, 24) > 0.5
    ad = ElasticNoRA(MaskedBase(layer, mask), 10, 6, alpha=12.0, merge="sparse")
    ad.calibrate(LayerStats(1, input_sq_norms=torch.ones(24, dtype=torch.float64)))
    with torch.no_grad():
        ad.inner_B.normal_()
    merged = ad.merged_weight()
    assert (merged[~mask] == 0).all() and (merged[mask] != layer.weight[mask]).any()


def test_bad_ranks_are_refused_by_the_kind():
    from supernet.errors import SupernetError

    with pytest.raises(SupernetError, match="exceeds --outer-rank 4"):
        ElasticNoRA(nn.Linear(24, 20), 4, 6)
    with pytest.raises(SupernetError, match="exceeds the layer size 20x24"):
        ElasticNoRA(nn.Linear(24, 20), 21, 6)
    assert adapter_kind("nora") is ElasticNoRA


# ----------------------------------------------------------------------------- end to end
NORA = ["--adapter", "nora", "--outer-rank", "16", "--ranks", "8,4,2"]

PEFT_LOADER = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from peft import PeftModel
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    print(json.dumps(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.tolist()))
"""


def test_nora_trains_searches_and_exports_and_its_peft_fold_loads_in_stock_peft(
        capsys, tiny_train_args, tiny_bert_dir, tmp_path):
    from supernet.loader import FROZEN_FILE, load_run

    code, _, err = cli(capsys, "train", *tiny_train_args, *NORA, "--name", "n")
    assert code == 0, err
    run = tmp_path / "runs" / "n"
    record = json.loads((run / "config.json").read_text())
    assert record["supernet"]["adapter"] == "nora" and record["supernet"]["outer_rank"] == 16
    assert (run / FROZEN_FILE).is_file()
    from supernet import runfiles

    weights = runfiles.load_tensors(runfiles.weights_path(run))  # six steps barely move B' from zero:
    g = torch.Generator().manual_seed(0)  # randomised, so that a wrong rank or fold shows
    weights = {k: torch.randn(v.shape, generator=g) * 0.5 if k.endswith("inner_B") else v for k, v in weights.items()}
    runfiles.save_tensors(runfiles.weights_path(run), weights)
    # trained numbers: 2 R r per adapter (plus the head, the same at every rank)
    setup, _ = load_run(run)
    n_adapters = len(setup.net.adapters)
    assert record["trainable_params"]["max"] - record["trainable_params"]["min"] == n_adapters * 2 * 16 * (8 - 2)
    # the rebuild reads the outer pairs back: equal to what training used, and not zero
    from safetensors.torch import load_file

    from supernet.loader import build, config_of_run

    saved = load_file(str(run / FROZEN_FILE))
    fresh = build(config_of_run(record)).net.frozen_state_dict()  # what a calibration computes, again
    for key, t in setup.net.frozen_state_dict().items():
        torch.testing.assert_close(t, saved[key], rtol=0, atol=0)
        torch.testing.assert_close(fresh[key], saved[key], rtol=1e-4, atol=1e-5)
        assert t.abs().max() > 0
    code, _, err = cli(capsys, "search", "--run", run, "--objectives", "acc,params", "--population", "2",
                       "--evaluations", "4", "--eval-samples", "16", "--name", "s")
    assert code == 0, err
    config = {g: c[i % len(c)] for i, (g, c) in enumerate(setup.net.space.choices.items())}
    (tmp_path / "c.json").write_text(json.dumps(config))
    for fmt in ("merged", "peft"):
        code, _, err = cli(capsys, "export", "--run", run, "--subnet", tmp_path / "c.json", "--format", fmt,
                           "--out", tmp_path / fmt)
        assert code == 0, err
        manifest = json.loads((tmp_path / fmt / "manifest.json").read_text())
        assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(peft["rank_pattern"].values()) == {8, 4, 2} and peft["r"] == 8

    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PEFT_LOADER, str(tiny_bert_dir), str(tmp_path / "peft"),
                           json.dumps(ids.tolist())], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    net = setup.net
    net.activate(config)
    with torch.no_grad():
        ours = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        net.activate(net.max_config())
        largest = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (theirs - ours).abs().max() <= 1e-4
    assert (ours - largest).abs().max() > 1e-3  # the configuration matters: the comparison can fail


def test_nora_follows_an_elastic_width_cut(capsys, tiny_train_args, tmp_path):
    code, _, err = cli(capsys, "train", *tiny_train_args, *NORA, "--widths", "1.0,0.5", "--width-groups", "global",
                       "--name", "w")
    assert code == 0, err
    run = tmp_path / "runs" / "w"
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "min", "--format", "merged",
                       "--out", tmp_path / "cut")
    assert code == 0, err
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["intermediate_size"] == 32 and manifest["width"]["stock_config"]
    # a PEFT adapter on the cut base: the outer pair's kept rows and columns (cut_param)
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "min", "--format", "peft",
                       "--out", tmp_path / "cut-peft")
    assert code == 0, err
    manifest = json.loads((tmp_path / "cut-peft" / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]


def test_a_run_without_its_frozen_state_is_refused(capsys, tiny_train_args, tmp_path):
    from supernet.loader import FROZEN_FILE

    code, _, err = cli(capsys, "train", *tiny_train_args, *NORA, "--max-steps", "2", "--name", "n")
    assert code == 0, err
    # --overwrite replaces the run, its frozen state included (supernet wrote it)
    code, _, err = cli(capsys, "train", *tiny_train_args, *NORA, "--max-steps", "2", "--name", "n", "--overwrite")
    assert code == 0, err
    (tmp_path / "runs" / "n" / FROZEN_FILE).unlink()
    code, _, err = cli(capsys, "eval", "--run", tmp_path / "runs" / "n")
    assert_refused(code, err, f"{FROZEN_FILE} is missing")


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "nora", "--outer-rank", "0"], "--outer-rank must be a positive whole number"),
    (["--adapter", "nora", "--outer-rank", "4"], "the largest rank 8 exceeds --outer-rank 4"),
    (["--adapter", "nora", "--outer-rank", "40"], "--outer-rank 40 exceeds the layer size"),
    (["--adapter", "nora", "--outer-rank", "2.5"], "--outer-rank"),
    (["--outer-rank", "16"], "--outer-rank applies to --adapter nora only"),
])
def test_bad_outer_ranks_end_as_one_line(capsys, tiny_train_args, tmp_path, flags, message):
    code, _, err = cli(capsys, "train", *tiny_train_args, *flags, "--name", "bad")
    assert_refused(code, err, message)
    assert not (tmp_path / "runs" / "bad").exists()
