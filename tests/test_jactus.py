"""JACTUS: the task-aware union of subspaces, the core, the global rank allocation, the kind end to end."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_refused, cli
from torch import nn

from supernet.adapters.jactus import RANK_STEP, ElasticJactus, allocate
from supernet.compress.calibration import LayerStats
from supernet.compress.subspace import energy_rank, union_basis, union_factors
from supernet.search.allocator import greedy_fill


def _covs(out_f, in_f, seed=0, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, in_f,
                                                                                      dtype=torch.float64)
    gr = torch.randn(tokens, out_f, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.1, out_f,
                                                                                         dtype=torch.float64)
    return x.T @ x / tokens, gr.T @ gr / tokens


# ----------------------------------------------------------------------------- subspaces
def test_energy_rank_is_the_smallest_prefix_reaching_the_threshold():
    v = torch.tensor([1.0, 4.0, 2.0, 3.0])  # sorted: 4, 3, 2, 1 of 10
    assert [energy_rank(v, t) for t in (0.1, 0.4, 0.41, 0.7, 0.9, 1.0)] == [1, 1, 2, 2, 3, 4]


def test_union_bases_are_orthonormal_and_contain_every_part():
    g = torch.Generator().manual_seed(0)
    for _trial in range(5):
        a = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=torch.float64))[0]
        b = torch.randn(30, 5, generator=g, dtype=torch.float64)
        b[:, 0] = a[:, 0] * 2 + a[:, 1]  # one direction already in the first part: not added twice
        q = union_basis([a, b])
        assert q.shape == (30, 10)
        torch.testing.assert_close(q.T @ q, torch.eye(10, dtype=torch.float64))
        for part in (a, b):  # the projection onto the union leaves each part as it is
            torch.testing.assert_close(q @ (q.T @ part), part)
        torch.testing.assert_close((q[:, :6] @ q[:, :6].T) @ a, a)  # the first part's span comes first


@pytest.mark.parametrize("union", [("W",), ("W", "x"), ("W", "g"), ("W", "x", "g")])
def test_union_factors_respect_the_parts_and_are_exact_at_full_rank(union):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 30, generator=g, dtype=torch.float64)
    cx, cg = _covs(20, 30)
    f = union_factors(w, cx, cg, {"W": 0.6, "x": 0.6, "g": 0.6}, union)
    assert (f.k_i > 0) == ("x" in union) and (f.k_o > 0) == ("g" in union)
    assert f.k_left >= f.k_w and f.k_right >= f.k_w
    assert f.k_left <= f.k_w + f.k_o and f.k_right <= f.k_w + f.k_i
    assert (f.energy[:-1] >= f.energy[1:] - 1e-9).all()  # ordered by captured energy
    full = union_factors(w, cx, cg, {"W": 1.0, "x": 1.0, "g": 1.0}, union)  # the union spans everything
    torch.testing.assert_close(full.left @ torch.diag(full.energy.sqrt()) @ full.right, w)


def test_the_core_keeps_the_most_output_energy_first():
    """Truncating the activation-weighted core to t components loses the least E||(W - W_t) x||^2 on the inputs."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    cx, cg = _covs(16, 24, seed=3)
    f = union_factors(w, cx, cg, {"W": 1.0, "x": 1.0, "g": 1.0})
    for t in (2, 5, 9):
        wt = f.left[:, :t] @ torch.diag(f.energy[:t].sqrt()) @ f.right[:t]
        err = torch.trace((w - wt) @ cx @ (w - wt).T)
        assert err == pytest.approx(float(f.energy[t:].sum()), rel=1e-6)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # the plain SVD truncation loses at least as much
        plain = u[:, :t] * s[:t] @ vh[:t]
        assert err <= torch.trace((w - plain) @ cx @ (w - plain).T) * (1 + 1e-9)


# ----------------------------------------------------------------------------- the allocator
def test_the_greedy_is_optimal_on_a_hand_built_toy_and_stays_in_budget():
    ladders = {"a": [1, 2, 3, 4], "b": [1, 2, 3], "c": [1, 2, 3, 4]}
    gains = {"a": [9.0, 4.0, 1.0], "b": [6.0, 5.0], "c": [3.0, 2.5, 0.5]}  # diminishing in every key
    cost = {"a": 1.0, "b": 1.0, "c": 1.0}  # equal step costs: the greedy is optimal for concave gains

    def total_cost(c):
        return sum(cost[k] * c[k] for k in c)

    def total_gain(c):
        return sum(sum(gains[k][: ladders[k].index(c[k])]) for k in c)

    for limit in range(3, 12):
        config, steps = greedy_fill(ladders, gains, total_cost, float(limit))
        assert total_cost(config) <= limit
        best = max(total_gain(dict(zip(ladders, combo, strict=True)))
                   for combo in itertools.product(*ladders.values())
                   if total_cost(dict(zip(ladders, combo, strict=True))) <= limit)
        assert total_gain(config) == pytest.approx(best)


def _calibrated(shapes, seed=0):
    adapters = {}
    g = torch.Generator().manual_seed(seed)
    for i, (out_f, in_f) in enumerate(shapes):
        layer = nn.Linear(in_f, out_f)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(out_f, in_f, generator=g) * (i + 1))
        a = ElasticJactus(layer, thresholds={"W": 0.99, "x": 0.9, "g": 0.9})
        cx, cg = _covs(out_f, in_f, seed=seed + i)
        a.calibrate(LayerStats(400, input_cov=cx * 400, grad_cov=cg * 400))
        adapters[f"l{i}"] = a
    return adapters


@pytest.mark.parametrize("retain", [0.5, 0.7, 0.9])
def test_jactus_allocation_never_exceeds_the_budget_and_favours_energy(retain):
    shapes = [(48, 32), (32, 48), (40, 40)]
    adapters = _calibrated(shapes)
    union_ranks = {n: a.factors.energy.numel() for n, a in adapters.items()}
    ranks = allocate(adapters, retain)
    kept = sum(ranks[n] * (a.in_features + a.out_features) for n, a in adapters.items())
    assert kept <= retain * sum(o * i for o, i in shapes)
    assert all(r >= RANK_STEP and r % RANK_STEP == 0 or r == union_ranks[n] for n, r in ranks.items())
    assert all(r <= union_ranks[n] for n, r in ranks.items())
    assert all(a.rank == ranks[n] and a.left.shape == (a.out_features, a.rank) for n, a in adapters.items())
    # the layer with 3x the weights' scale (l2) captures the most energy per step: it gets the largest rank
    assert ranks["l2"] == max(ranks.values())


def test_a_model_without_a_registered_factored_class_is_refused_before_calibration():
    from transformers import GPT2Config, GPT2LMHeadModel

    from supernet.errors import SupernetError
    from supernet.network import SuperNetConfig, SuperNetwork, default_targets

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100, n_positions=32))
    net = SuperNetwork(model, SuperNetConfig(target_modules=default_targets(model), adapter="jactus"))
    with pytest.raises(SupernetError, match="not 'gpt2'"):
        ElasticJactus.check_calibration(net.adapters, net.config, model)


def test_a_budget_below_one_step_per_layer_is_refused():
    from supernet.errors import SupernetError

    with pytest.raises(SupernetError, match="raise it"):
        allocate(_calibrated([(48, 32), (32, 48)]), 0.1)


# ----------------------------------------------------------------------------- the kind
def test_the_kind_computes_its_factors_and_nests_its_fractions():
    (a,) = _calibrated([(40, 40)]).values()
    allocate({"l": a}, 0.9)
    with torch.no_grad():
        a.core.add_(torch.randn(a.rank, a.rank) * 0.3)  # trained cores are not diagonal: the test can fail
    x = torch.randn(5, 40)
    expected = x @ (a.left @ a.core @ a.right).T + a.base.bias
    torch.testing.assert_close(a(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.merged_weight(), a.left @ a.core @ a.right)
    a.fractions = [1.0, 0.5]
    a.set_active({"core": 0.5})
    k = round(0.5 * a.rank)
    torch.testing.assert_close(a(x), x @ (a.left[:, :k] @ a.core[:k, :k] @ a.right[:k]).T + a.base.bias,
                               atol=1e-5, rtol=1e-5)
    assert a.adapter_params() == k * k and a.shipped_params() == k * 80 and a.macs_per_token() == k * 80
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {"core"}


JACTUS = ["--adapter", "jactus", "--budget", "params=0.9", "--core-fractions", "1.0,0.5"]


def test_jactus_trains_searches_exports_and_rebuilds(capsys, tiny_train_args, tiny_bert_dir, tmp_path):
    from supernet import runfiles
    from supernet.loader import FROZEN_FILE, load_run

    code, _, err = cli(capsys, "train", *tiny_train_args, *JACTUS, "--name", "j")
    assert code == 0, err
    run = tmp_path / "runs" / "j"
    record = json.loads((run / "config.json").read_text())
    assert record["supernet"]["adapter"] == "jactus" and record["supernet"]["retain"] == 0.9
    setup, _ = load_run(run)
    net = setup.net
    original = sum(a.in_features * a.out_features for a in net.adapters.values())
    kept = sum(a.rank * (a.in_features + a.out_features) for a in net.adapters.values())
    assert 0 < kept <= 0.9 * original
    assert {n: s["rank"] for n, s in record["adapters"].items()} == {n: a.rank for n, a in net.adapters.items()}
    assert (run / FROZEN_FILE).is_file()
    assert record["macs"]["min"] < record["macs"]["max"]  # half the core: fewer MACs
    code, _, err = cli(capsys, "search", "--run", run, "--objectives", "acc,macs", "--population", "2",
                       "--evaluations", "4", "--eval-samples", "16", "--name", "s")
    assert code == 0, err
    with torch.no_grad():  # trained six steps: cores barely moved; randomised so that a wrong fold shows
        g = torch.Generator().manual_seed(0)
        weights = runfiles.load_tensors(runfiles.weights_path(run))
        weights = {k: v + torch.randn(v.shape, generator=g) * 0.3 if k.endswith(".core") else v
                   for k, v in weights.items()}
        runfiles.save_tensors(runfiles.weights_path(run), weights)
    code, out, err = cli(capsys, "export", "--run", run, "--subnet", "min", "--format", "merged",
                         "--out", tmp_path / "merged")
    assert code == 0, err
    written = json.loads(out)["exports"][0]
    assert written["model_params"] < written["original_params"] and "smaller model:" in err
    manifest = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]
    factored = manifest["factored"]
    assert factored["weights"] < factored["original_weights"] and factored["layers"] == len(net.adapters)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "supernet-cut-bert" and len(config["factored_shapes"]) == len(net.adapters)
    # a fresh process: transformers and the registered module class only, no super-network
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    probe = ("import json, sys, torch; import supernet.cut_models; "
             "from transformers import AutoModelForSequenceClassification as A; "
             f"m = A.from_pretrained({str(tmp_path / 'merged')!r}).eval(); "
             "assert 'supernet.network' not in sys.modules; "
             f"ids = torch.tensor({ids.tolist()}); "
             "print(json.dumps([sum(p.numel() for p in m.parameters()), "
             "m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.tolist()]))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    params, logits = json.loads(res.stdout.strip().splitlines()[-1])
    setup, _ = load_run(run)
    net = setup.net
    net.activate(net.min_config())
    with torch.no_grad():
        ours = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        net.activate(net.max_config())
        largest = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (torch.tensor(logits) - ours).abs().max() <= 1e-4
    assert (ours - largest).abs().max() > 1e-3  # the fraction matters: the comparison can fail
    from transformers import AutoModelForSequenceClassification

    original = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    assert params == manifest["shipped_params"] < sum(p.numel() for p in original.parameters())
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "max", "--format", "peft",
                       "--out", tmp_path / "peft")
    assert_refused(code, err, "cannot be written as a PEFT LoRA adapter")


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "jactus", "--thresholds", "0,0.9,0.9"], "--thresholds takes three energy fractions"),
    (["--adapter", "jactus", "--thresholds", "0.9,0.9"], "--thresholds takes three energy fractions"),
    (["--adapter", "jactus", "--budget", "params=1.5"], "--budget params=F takes a share F in (0, 1]"),
    (["--adapter", "jactus", "--budget", "macs=0.5"], "--budget takes params=F"),
    (["--adapter", "jactus", "--budget", "params=0.05"], "raise it"),
    (["--adapter", "jactus", "--union", "x,g"], "--union takes W and any of x, g"),
    (["--adapter", "jactus", "--union", "W,q"], "--union takes W and any of x, g"),
    (["--adapter", "jactus", "--core-fractions", "1.5"], "--core-fractions"),
    (["--adapter", "jactus", "--sparsity", "0.5"], "takes a dense base"),
    (["--union", "W,x"], "--union applies to --adapter jactus only"),
    (["--budget", "params=0.8"], "--budget applies to --adapter jactus only"),
])
def test_bad_jactus_settings_end_as_one_line(capsys, tiny_train_args, tmp_path, flags, message):
    code, _, err = cli(capsys, "train", *tiny_train_args, *flags, "--name", "bad")
    assert_refused(code, err, message)
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_llama_jactus_network_exports_factored_layers_equal_to_it(tmp_path):
    """Grouped-query attention (K/V narrower than Q), a causal-LM loss for C_g, factored Llama layers."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from supernet.adapters.calibrate import calibrate_adapters
    from supernet.export import export_merged
    from supernet.network import SuperNetConfig, SuperNetwork, default_targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    net = SuperNetwork(model, SuperNetConfig(target_modules=default_targets(model), adapter="jactus", retain=0.9,
                                             core_fractions=[1.0, 0.5]))
    ids = torch.randint(1, 1000, (4, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    frozen = calibrate_adapters(net, lambda: [batch], None)
    assert frozen and all(a.rank > 0 for a in net.adapters.values())
    with torch.no_grad():
        for a in net.adapters.values():
            a.core.add_(torch.randn(a.rank, a.rank) * 0.2)
    config = net.min_config()
    manifest = export_merged(net, config, tmp_path / "m", batches=[{k: v for k, v in batch.items() if k != "labels"}])
    assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]
    shapes = json.loads((tmp_path / "m" / "config.json").read_text())["factored_shapes"]
    k_proj = next(v for n, v in shapes.items() if n.endswith("k_proj"))
    assert k_proj[0] == 16  # 2 KV heads of 8 dimensions: the factored K keeps its output width


@pytest.mark.parametrize("kind", [{"adapter": "jactus", "budget": "params=0.9", "core_fractions": [1.0, 0.5]},
                                  {"adapter": "nora", "outer_rank": 16, "ranks": [8, 4]}])
def test_a_calibrated_kind_resumes_exactly(tiny_bert_dir, tiny_csv, tmp_path, kind):
    """The frozen state is read back (not calibrated again) and the optimizer state fits it."""
    import pandas as pd
    from test_train import Crash, tiny_cfg

    from supernet import runfiles
    from supernet.train import resume, train

    full = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="full", max_steps=8, save_every=4, **kind)
    train(full)
    broken = tiny_cfg(tiny_bert_dir, tiny_csv, tmp_path, name="broken", max_steps=8, save_every=4, **kind)

    def crash(step, trainer):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(broken, on_step=crash)
    resume(broken.run_dir())
    a = runfiles.load_tensors(full.run_dir() / runfiles.ADAPTER)
    b = runfiles.load_tensors(broken.run_dir() / runfiles.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = (pd.read_csv(r.run_dir() / "train_log.csv") for r in (full, broken))
    assert list(log_a["config"]) == list(log_b["config"])
