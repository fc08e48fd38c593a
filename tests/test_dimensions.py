"""Typed dimensions: the space, the scaling mode as a searched dimension, its costs, search and PEFT export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config
from transformers import BertForSequenceClassification

from supernet.adapters import lora_scale
from supernet.dimensions import Dimension
from supernet.errors import SupernetError
from supernet.network import SuperNetConfig, SuperNetwork
from supernet.search import SearchSettings, run_search
from supernet.space import SearchSpace
from supernet.train import step_configs

MODES = ["lora", "rora", "fixed"]


def scaled_net(per="group", merge="plain", **kw):
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    cfg = SuperNetConfig(target_modules=["query", "key", "value", "dense"], ranks=[8, 6, 4],
                         trainable_modules=["classifier"], scalings=MODES, scaling_per=per, merge=merge, **kw)
    net = SuperNetwork(model, cfg)
    with torch.no_grad():  # B is zero at init: without this no test of the update could fail
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.5)
    return net


def test_rank_only_space_is_written_as_before_kinds_existed():
    space = SearchSpace({"a": [4, 8], "b": [2]})
    assert space.to_json() == {"choices": {"a": [8, 4], "b": [2]}}
    assert SearchSpace.from_json(space.to_json()) == space
    assert space.dimension("a").kind == "rank"


def test_typed_space_round_trips_and_reads_choices_by_kind():
    space = SearchSpace(dimensions=[Dimension("g", "rank", [4, 8]), Dimension("g:scaling", "scaling", MODES)])
    data = json.loads(json.dumps(space.to_json()))
    assert data == {"choices": {"g": [8, 4], "g:scaling": MODES}, "kinds": {"g:scaling": "scaling"}}
    assert SearchSpace.from_json(data) == space
    assert space.max_config() == {"g": 8, "g:scaling": "lora"}
    assert space.min_config() == {"g": 4, "g:scaling": "fixed"}
    assert space.mid_config() == {"g": 8, "g:scaling": "rora"}
    assert space.named_config("min@rora") == {"g": 4, "g:scaling": "rora"}
    assert space.validate({"g": 4, "g:scaling": "rora"}) == {"g": 4, "g:scaling": "rora"}
    for bad, message in (({"g": 4, "g:scaling": "xx"}, "unknown scaling"), ({"g": "4", "g:scaling": "lora"}, "rank"),
                         ({"g": 5, "g:scaling": "lora"}, "not one of")):
        with pytest.raises(SupernetError, match=message):
            space.validate(bad)
    samples = {json.dumps(space.sample(np.random.default_rng(s)), sort_keys=True) for s in range(64)}
    assert len(samples) == space.size() == 6


def test_scaling_dimension_per_group_and_global():
    net = scaled_net()
    kinds = {d.name: d.kind for d in net.space.dimensions}
    assert kinds["L0.qkv"] == "rank" and kinds["L0.qkv:scaling"] == "scaling"
    assert len(kinds) == 2 * len(net.groups)
    assert net.space.dimension("L0.qkv:scaling").modules == tuple(net.groups["L0.qkv"])
    glob = scaled_net(per="global")
    assert [d.name for d in glob.space.dimensions if d.kind == "scaling"] == ["scaling"]
    assert set(glob.space.dimension("scaling").modules) == set(glob.adapters)
    # one mode is no dimension
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    one = SuperNetwork(model, SuperNetConfig(target_modules=["query"], ranks=[4], scalings=["rora"]))
    assert one.config.scaling == "rora" and all(d.kind == "rank" for d in one.space.dimensions)


def test_activation_sets_each_module_scale_and_the_forward_uses_it():
    net = scaled_net()
    config = net.space.max_config()
    groups = list(net.groups)
    for i, g in enumerate(groups):
        config[g] = [8, 6, 4][i % 3]
        config[f"{g}:scaling"] = MODES[(i + 1) % 3]
    net.activate(config)
    for g in groups:
        for n in net.groups[g]:
            ad = net.adapters[n]
            x = torch.randn(3, ad.in_features)
            rank, mode = config[g], config[f"{g}:scaling"]
            assert ad.scaling == lora_scale(mode, 32.0, rank, 8)
            want = ad.base(x) + lora_scale(mode, 32.0, rank, 8) * (x @ ad.lora_A[:rank].T) @ ad.lora_B[:, :rank].T
            torch.testing.assert_close(ad(x), want)
    assert net.active_config() == config


def test_costs_do_not_depend_on_the_scaling_mode():
    net = scaled_net()
    a = net.space.max_config()
    b = {k: ("fixed" if k.endswith(":scaling") else v) for k, v in a.items()}
    assert net.macs(a) == net.macs(b) and net.trainable_params(a) == net.trainable_params(b)
    assert net.size(a) == net.size(b)


def test_sampler_draws_scaling_with_the_ranks():
    net = scaled_net(per="global")
    modes = {c["scaling"] for step in range(40) for c in step_configs(net, "uniform", 0, step)}
    assert modes == set(MODES)
    sandwich = step_configs(net, "sandwich", 0, 0)
    assert sandwich[0]["scaling"] == "lora" and sandwich[1]["scaling"] == "fixed"


def test_search_over_a_mixed_space_resumes_from_its_history(tmp_path):
    space = SearchSpace(dimensions=[Dimension("a", "rank", [2, 4]), Dimension("scaling", "scaling", MODES)])
    calls = []

    def evaluate(config):
        calls.append(config)
        return {"accuracy": config["a"] / 4 + MODES.index(config["scaling"]) / 10, "loss": 1.0}

    def cost(config):
        return {"macs": float(config["a"]), "params": float(config["a"])}

    settings = SearchSettings(algorithm="grid", population=2, evaluations=6)
    first = run_search(space, evaluate, cost, tmp_path / "s", settings)
    assert len(first.history) == 6 and len(calls) == 6
    assert json.loads((tmp_path / "s" / "search.json").read_text())["space"]["kinds"] == {"scaling": "scaling"}
    again = run_search(space, evaluate, cost, tmp_path / "s", settings, resume=True)
    assert again.evaluator_calls == 0 and again.history.equals(first.history)
    best = json.loads(next((tmp_path / "s" / "subnets").glob("*.json")).read_text())
    assert space.validate(best["config"]) == best["config"]


def test_peft_export_of_mixed_modes_reproduces_every_scale(tmp_path):
    """Stock PEFT gets one use_rslora per adapter, so mixed modes are written as plain LoRA with a
    per-module alpha = scale * r; the export reloads it with PeftModel.from_pretrained and checks
    every layer's scale and the logits."""
    from supernet.export import export_peft

    net = scaled_net()
    config = net.space.max_config()
    for i, g in enumerate(net.groups):
        config[g] = [8, 6, 4][i % 3]
        config[f"{g}:scaling"] = MODES[i % 3]
    batches = [{"input_ids": torch.randint(5, 1000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}]
    manifest = export_peft(net, config, tmp_path / "peft", batches=batches, scale="pattern")
    assert manifest["verification"]["max_abs_diff"] <= 1e-4
    # the params objective is what the written adapter file holds (counted from its tensors)
    assert manifest["shipped_params"] == net.shipped_params(config)
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["use_rslora"] is False
    alphas = adapter_config["alpha_pattern"]
    for g in net.groups:
        rank, mode = config[g], config[f"{g}:scaling"]
        for n in net.groups[g]:
            key = next(k for k in alphas if k.replace("\\", "").lstrip("^") == n)
            assert math.isclose(alphas[key] / rank, lora_scale(mode, 32.0, rank, 8), rel_tol=1e-9)


def test_params_objective_counts_no_factors_folded_into_the_base():
    from supernet.bases import MaskedBase
    from supernet.network import target_layers

    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    cfg = SuperNetConfig(target_modules=["query", "value"], ranks=[4, 2], trainable_modules=["classifier"],
                         merge="sparse")
    bases = {n: MaskedBase(m, torch.rand(m.out_features, m.in_features) > 0.5)
             for n, m in target_layers(model, cfg).items()}
    net = SuperNetwork(model, cfg, bases)
    head = net.head_params()
    assert net.trainable_params() > head  # the factors are trained ...
    assert net.shipped_params() == head   # ... but folded into the sparse base, they never ship


def test_searched_scaling_through_the_cli(capsys, tiny_train_args, tmp_path):
    from conftest import cli

    code, _, err = cli(capsys, "train", *tiny_train_args, "--scalings", "lora,rora,fixed", "--scaling-per", "global",
                       "--name", "sc")
    assert code == 0, err
    run = tmp_path / "runs" / "sc"
    record = json.loads((run / "config.json").read_text())
    assert record["choices"]["scaling"] == MODES and record["kinds"] == {"scaling": "scaling"}
    logged = {json.loads(c)["scaling"] for c in __import__("pandas").read_csv(run / "train_log.csv")["config"]}
    assert logged <= set(MODES) and len(logged) > 1  # sampled per step
    results = {}
    for mode in MODES:
        code, out, err = cli(capsys, "eval", "--run", run, "--subnet", f"min@{mode}", "--split", "test")
        assert code == 0, err
        results[mode] = json.loads(out)
        assert results[mode]["config"]["scaling"] == mode
    # one set of weights, three scales (at r_max, lora's alpha/r is fixed's alpha/r_max: hence min)
    assert len({r["loss"] for r in results.values()}) == 3
    code, _, err = cli(capsys, "search", "--run", run, "--objectives", "acc,macs", "--population", "4",
                       "--evaluations", "8", "--eval-samples", "16", "--name", "s")
    assert code == 0, err
    code, _, err = cli(capsys, "export", "--run", run, "--subnet", "best", "--search", "s", "--format", "peft",
                       "--out", tmp_path / "peft")
    assert code == 0, err
    code, _, err = cli(capsys, "train", *tiny_train_args, "--scalings", "lora,nope", "--name", "bad")
    assert code == 2 and "unknown scaling 'nope'" in err and not (tmp_path / "runs" / "bad").exists()


def test_allocator_and_constraints_take_a_costless_dimension(tmp_path):
    """A scaling dimension costs nothing: the allocator takes its steps when they lower the loss (gain
    per unit cost is infinite), and a constraint on cost never excludes a mode."""
    space = SearchSpace(dimensions=[Dimension("a", "rank", [2, 4, 8]), Dimension("scaling", "scaling", MODES)])

    def evaluate(config):
        penalty = {"lora": 0.0, "rora": 0.1, "fixed": 0.2}[config["scaling"]]
        return {"accuracy": 0.5, "loss": 1.0 / config["a"] + penalty}

    def cost(config):
        return {"macs": float(config["a"]), "params": float(config["a"])}

    result = run_search(space, evaluate, cost, tmp_path / "alloc",
                        SearchSettings(algorithm="allocator", objectives="loss,macs", population=2, evaluations=2,
                                       budget="macs=4"))
    assert result.selected["config"] == {"a": 4, "scaling": "lora"}
    grid = run_search(space, evaluate, cost, tmp_path / "grid",
                      SearchSettings(algorithm="grid", objectives="loss,macs", population=3, evaluations=3,
                                     constraint="macs<=4"))
    assert {json.loads(c)["scaling"] for c in grid.history["config"]} == set(MODES)
    assert {json.loads(c)["a"] for c in grid.history["config"]} == {2, 4}
