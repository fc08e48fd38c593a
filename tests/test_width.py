"""Elastic width and heads (LoNAS Mode B): re-ordering, masks, the physical cut, costs, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_refused, cli, tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, LlamaForCausalLM

from supernet.export_core import merged_model
from supernet.network import SuperNetConfig, SuperNetwork, default_targets
from supernet.width import find_blocks, kept_heads
from supernet.width_order import apply_order, importance_order


def bert(attn="sdpa"):
    return BertForSequenceClassification(tiny_bert_config(num_labels=2, attn_implementation=attn)).eval()


def llama(attn="sdpa"):
    # 4 query heads in 2 KV groups: cutting heads must keep 1 or 2 per group
    return LlamaForCausalLM(tiny_llama_config(attn_implementation=attn)).eval()


def batch(seed=0, n=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding left out of the statistics
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def fresh_process_diff(tmp_path, b, expected, imports: str, load: str) -> float:
    """Max |logits - expected| of the model that ``load`` (Python binding ``m``) builds in a fresh
    interpreter after ``import torch, transformers`` and ``imports``: what a user's loader sees."""
    torch.save({"b": b, "expected": expected}, tmp_path / "ref.pt")
    probe = (f"import torch, transformers{imports}; {load}; m = m.eval(); "
             f"r = torch.load({str(tmp_path / 'ref.pt')!r}); "
             "print(float((m(**r['b']).logits - r['expected']).abs().max()))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return float(res.stdout.split()[-1])


def reordered(model):
    blocks = find_blocks(model)
    order = importance_order(model, blocks, [batch(1), batch(2)], True, True)
    apply_order(model, blocks, order)
    return order


def width_net(model, widths=(1.0, 0.75, 0.5), heads=(1.0, 0.5), per="block", **kw):
    head = ["classifier"] if isinstance(model, BertForSequenceClassification) else []
    net = SuperNetwork(model, SuperNetConfig(default_targets(model), ranks=[4, 2], widths=list(widths),
                                             heads=list(heads), width_groups=per, trainable_modules=head, **kw))
    with torch.no_grad():  # B is zero at init: randomised, so that a wrong cut of an adapter shows
        for a in net.adapters.values():
            a.lora_B.normal_(std=0.2)
    return net


@pytest.mark.parametrize("make", [bert, llama])
def test_reordering_preserves_outputs_and_orders_by_importance(make):
    model = make()
    b = batch()
    before = logits(model, b)
    order = reordered(model)
    assert torch.allclose(logits(model, b), before, atol=1e-5, rtol=1e-5)
    blocks = find_blocks(model)
    assert len(order) == 2 * len(blocks)
    for blk in blocks:
        assert sorted(order[blk.down].tolist()) == list(range(blk.neurons))
        heads = order[blk.o].tolist()
        assert sorted(heads) == list(range(blk.heads))
        if blk.grouped:  # a head never leaves its KV group
            size = blk.heads // blk.kv_heads
            assert all(h // size == i // size for i, h in enumerate(heads))
    # after re-ordering the order is the identity: the most important come first already
    again = importance_order(model, blocks, [batch(1), batch(2)], True, True)
    assert all(v.tolist() == sorted(v.tolist()) for v in again.values())


def test_heads_stay_whole_within_kv_groups():
    blk = find_blocks(llama())[0]
    assert (blk.heads, blk.kv_heads) == (4, 2)
    assert kept_heads(blk, 1) == [0, 2]  # the first head of each group
    net = width_net(llama(), widths=(), heads=(1.0, 0.5), per="global")
    cuts = net.cuts({**net.min_config()})
    q = [n for n in cuts if n.endswith("q_proj")][0]
    assert cuts[q][1].tolist() == list(range(0, 8)) + list(range(16, 24))  # head_dim 8
    assert not any(n.endswith(("k_proj", "v_proj")) for n in cuts)  # every KV head stays


@pytest.mark.parametrize("make,heads", [(bert, ()), (llama, (1.0, 0.5))])
def test_super_network_equals_physically_cut_model(make, heads):
    model = make()
    reordered(model)
    net = width_net(model, heads=heads, per="global")
    b = batch(3)
    rng = np.random.default_rng(0)
    for cfg in [net.max_config(), net.mid_config(), net.min_config(), net.sample(rng), net.sample(rng)]:
        net.activate(cfg)
        expected = logits(net.model, b)
        cut = merged_model(net, cfg)
        assert torch.allclose(logits(cut, b), expected, atol=1e-5, rtol=1e-4)
        blocks = [blk for blk in find_blocks(cut) if blk.has_ffn]
        assert cut.config.intermediate_size == blocks[0].neurons == round(64 * cfg["width"])
        if heads:
            assert cut.config.num_attention_heads == round(4 * cfg["heads"])
            assert cut.config.num_key_value_heads == 2


@pytest.mark.parametrize("make,heads", [(bert, (1.0, 0.5)), (llama, (1.0, 0.5))])
def test_per_block_cuts_export_as_the_registered_cut_class(tmp_path, make, heads):
    """Per-block widths (and BERT with fewer heads, which no stock BERT config holds) are saved as
    the cut variant of the stock class; a fresh process loads it with transformers after
    ``import supernet.cut_models``, and computes what the super-network does."""
    from supernet.export import export_merged

    model = make()
    reordered(model)
    net = width_net(model, heads=heads)
    cfg = {**net.max_config(), "L0:width": 0.5, "L1:width": 0.75, "L1:heads": 0.5}
    net.activate(cfg)
    downs = [cut[0].numel() for n, cut in net.cuts().items() if n.endswith(("down_proj", "layer.0.output.dense",
                                                                              "layer.1.output.dense"))]
    assert sorted(downs) == [32, 48]  # block 0 keeps half its 64 neurons, block 1 three quarters
    b = batch(4)
    expected = logits(net.model, b)
    cut = merged_model(net, cfg)
    assert cut.config.model_type.startswith("supernet-cut-")
    assert torch.allclose(logits(cut, b), expected, atol=1e-5, rtol=1e-4)
    manifest = export_merged(net, cfg, tmp_path / "cut", batches=[b])
    assert manifest["width"]["stock_config"] is False and "supernet.cut_models" in manifest["width"]["load"]
    auto = "AutoModelForCausalLM" if make is llama else "AutoModelForSequenceClassification"
    load = f"m = transformers.{auto}.from_pretrained({str(tmp_path / 'cut')!r})"
    assert fresh_process_diff(tmp_path, b, expected, ", supernet.cut_models", load) < 1e-4


@pytest.mark.parametrize("make", [bert, llama])
def test_macs_and_size_follow_the_cut(make):
    from torch.utils.flop_counter import FlopCounterMode

    model = make(attn="eager")  # eager attention runs its matmuls as bmm, which FlopCounterMode counts
    net = width_net(model, heads=() if make is bert else (1.0, 0.5), per="global")
    seq = 12
    for cfg in [net.max_config(), net.mid_config(), net.min_config()]:
        cut = merged_model(net, cfg)
        with FlopCounterMode(display=False) as fc:
            cut(input_ids=torch.ones(1, seq, dtype=torch.long))
        assert net.macs(cfg, seq, merged=True) == fc.get_total_flops() // 2
        shipped = sum(p.numel() * p.element_size() for p in cut.parameters())
        assert net.size(cfg, merged=True) == shipped
    assert net.macs(net.min_config(), seq) < net.macs(net.max_config(), seq)


def test_adapters_are_cut_with_their_base():
    net = width_net(llama(), per="global")
    cfg = net.min_config()
    cuts = net.cuts(cfg)
    down = [n for n in cuts if n.endswith("down_proj")][0]
    small = net.adapters[down].cut(*cuts[down])
    assert small.lora_A.shape == (4, 32) and small.base.in_features == 32
    assert net.trainable_params(cfg) == net.head_params() + sum(
        2 * (a.cut(*cuts[n]) if n in cuts else a).in_features + 2 * (a.cut(*cuts[n]) if n in cuts else a).out_features
        for n, a in net.adapters.items())


def test_quantised_base_cut_keeps_whole_groups():
    from supernet.bases import QuantizedBase

    layer = torch.nn.Linear(64, 8)
    base = QuantizedBase(layer, 4, 16)
    keep = torch.arange(32)
    small = base.cut(keep, None)
    assert torch.equal(small.qweight, base.qweight[:, :32]) and small.scale.shape == (8, 2)
    assert torch.equal(small.weight(), base.weight()[:, :32])
    with pytest.raises(ValueError, match="whole quantisation groups"):
        base.cut(torch.arange(24), None)


@pytest.mark.parametrize("flag,value,message", [
    ("--widths", "1.0,0.3", "valid widths"),
    ("--widths", "1.5", "in (0, 1]"),
    ("--widths", "wide", "comma-separated numbers"),
    ("--heads", "1.0,0.3", "valid fractions"),
    ("--width-groups", "layer", "invalid choice"),
])
def test_bad_width_values_end_in_one_line(capsys, tiny_train_args, flag, value, message):
    code, out, err = cli(capsys, "train", *tiny_train_args, flag, value)
    assert_refused(code, err, message)


def test_width_that_breaks_a_quantisation_group_is_refused(capsys, tiny_train_args):
    code, out, err = cli(capsys, "train", *tiny_train_args, "--bits", "4", "--group-size", "32",
                         "--widths", "1.0,0.75")
    assert_refused(code, err, "multiple of 32")


def test_cli_trains_searches_and_exports_a_stock_loadable_cut(capsys, tmp_path, tiny_llama_dir, tiny_csv):
    import json

    run = tmp_path / "runs" / "w"
    args = ["--model", str(tiny_llama_dir), "--dataset", str(tiny_csv), "--text-column", "sentence",
            "--label-column", "sentiment", "--prompt", "Review: {text}\nSentiment:", "--ranks", "4,2",
            "--max-steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--save-every", "2", "--eval-samples", "8", "--calibration-samples", "8",
            "--widths", "1.0,0.5", "--heads", "1.0,0.5", "--width-groups", "global", "--out", str(tmp_path / "runs"),
            "--name", "w"]
    code, out, err = cli(capsys, "train", *args)
    assert code == 0, err
    assert (run / "width_order.safetensors").exists()
    code, out, err = cli(capsys, "eval", "--run", str(run), "--subnet", "min", "--split", "validation",
                         "--limit", "8")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["config"]["width"] == 0.5
    code, out, err = cli(capsys, "search", "--run", str(run), "--objectives", "acc,macs", "--algorithm", "random",
                         "--evaluations", "4", "--population", "4", "--eval-samples", "8")
    assert code == 0, err
    # the allocator spends a MACs budget over ranks, width and heads alike
    record = json.loads((run / "config.json").read_text())
    budget = (record["macs"]["max"] + record["macs"]["min"]) / 2
    code, out, err = cli(capsys, "search", "--run", str(run), "--algorithm", "allocator", "--budget",
                         f"macs={budget:.6g}", "--eval-samples", "8")
    assert code == 0, err
    chosen = json.loads(out)["selected"]["config"]
    assert {"width", "heads"} <= set(chosen)
    from supernet.loader import load_run

    assert load_run(run, weights=False)[0].net.macs(chosen, record["train"]["max_length"]) <= budget
    code, out, err = cli(capsys, "plot", "--run", str(run))
    assert code == 0, err
    export = tmp_path / "cut"
    code, out, err = cli(capsys, "export", "--run", str(run), "--subnet", "min", "--out", str(export))
    assert code == 0, err
    written = json.loads(out)["exports"][0]
    assert written["model_params"] < written["original_params"] and written["speedup"] > 0
    assert "smaller model:" in err
    # a fresh process with stock transformers only: no supernet import, the cut config as written
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
             f"m = A.from_pretrained({str(export)!r}); "
             "assert 'supernet' not in sys.modules; "
             "c = m.config; print(c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, "
             "m.model.layers[0].self_attn.q_proj.out_features)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["32", "2", "2", "16"]


def test_latency_objective_times_the_cut_model():
    from supernet.evaluator import Evaluator

    net = width_net(llama(), per="global")
    evaluator = Evaluator.__new__(Evaluator)  # only the latency probe: no data needed
    evaluator.net, evaluator.device, evaluator.seq_len, evaluator.latency_batch = net, torch.device("cpu"), 8, 2
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(m.out_features) if isinstance(m, torch.nn.Linear) and m.out_features in (
            16, 32, 64) and not any(m is x for x in net.model.modules()) else None)
    try:
        assert evaluator.latency(net.min_config(), repeats=1) > 0
    finally:
        hook.remove()
    assert seen and 64 not in seen  # layers outside the super-network, every one narrowed (q 16, up/gate 32)


@pytest.mark.parametrize("per", ["global", "block"])
def test_peft_export_of_a_cut_subnetwork_ships_its_cut_base(tmp_path, per):
    """The adapter fits the narrowed base, saved beside it; stock PEFT on that base (reloaded from
    disk, in a fresh process) computes what the super-network does."""
    from supernet.export import export

    model = llama()
    reordered(model)
    net = width_net(model, per=per)
    cfg = {**net.min_config(), **({"L0:width": 0.75} if per == "block" else {})}
    b = batch(5)
    net.activate(cfg)
    expected = logits(net.model, b)
    manifest = export(net, cfg, tmp_path / "p", fmt="peft", batches=[b])
    assert manifest["width"]["stock_config"] is (per == "global")
    assert (tmp_path / "p" / "base" / "config.json").exists()
    load = (f"base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'p' / 'base')!r}); "
            f"m = peft.PeftModel.from_pretrained(base, {str(tmp_path / 'p')!r})")
    imports = ", peft" + ("" if per == "global" else ", supernet.cut_models")
    assert fresh_process_diff(tmp_path, b, expected, imports, load) < 1e-4


def test_compressed_export_of_a_cut_subnetwork_keeps_the_trained_integers(tmp_path):
    """QA-SparsePEFT on an INT8 base, cut to a global width: the integers of the kept rows and
    columns (whole groups) are stored, and reload bit for bit (the export verifies it)."""
    from supernet.bases import QuantizedBase
    from supernet.errors import SupernetError
    from supernet.export import export
    from supernet.targets import target_layers

    model = llama()
    reordered(model)
    cfg = SuperNetConfig(default_targets(model), ranks=[4, 2], widths=[1.0, 0.5], width_groups="global",
                         merge="qa-sparse")
    net = SuperNetwork(model, cfg, {n: QuantizedBase(m, 8, 8) for n, m in target_layers(model, cfg).items()})
    with torch.no_grad():
        for a in net.adapters.values():
            a.lora_B.normal_(std=0.2)
    # the costs of a cut integer base: whole groups kept, bytes and MACs fall with the width
    assert net.size(net.min_config()) < net.size(net.max_config())
    assert net.macs(net.min_config(), 8) < net.macs(net.max_config(), 8)
    manifest = export(net, net.min_config(), tmp_path / "c", fmt="compressed", batches=[batch(6)])
    assert manifest["verification"]["weights_exact"] is True
    down = [n for n in manifest["layers"] if n.endswith("down_proj")][0]
    assert manifest["layers"][down]["shape"] == [32, 32]  # hidden x the 32 kept neurons
    block = SuperNetConfig(default_targets(llama()), ranks=[4, 2], widths=[1.0, 0.5], merge="qa-sparse")
    m2 = llama()
    net2 = SuperNetwork(m2, block, {n: QuantizedBase(m, 8, 8) for n, m in target_layers(m2, block).items()})
    with pytest.raises(SupernetError, match="stock architectures only"):
        export(net2, {**net2.max_config(), "L0:width": 0.5}, tmp_path / "c2", fmt="compressed")

def test_a_width_run_resumes_and_needs_its_saved_order(capsys, tiny_train_args, tmp_path):
    args = [*tiny_train_args, "--widths", "1.0,0.5", "--name", "wr", "--max-steps", "3"]
    code, _, err = cli(capsys, "train", *args)
    assert code == 0, err
    run = tmp_path / "runs" / "wr"
    code, _, err = cli(capsys, "train", "--resume", str(run), "--max-steps", "6")
    assert code == 0, err
    code, out, err = cli(capsys, "eval", "--run", str(run), "--subnet", "min", "--limit", "8")
    assert code == 0, err
    (run / "width_order.safetensors").unlink()
    code, _, err = cli(capsys, "eval", "--run", str(run), "--subnet", "min", "--limit", "8")
    assert_refused(code, err, "width_order.safetensors is missing")


def test_width_over_a_pruned_base_exports_a_cut_model_that_keeps_its_zeros(capsys, tiny_train_args, tmp_path):
    """The order is applied before pruning, so the masks are those of the permuted weights; the cut
    export of a SparsePEFT run keeps exactly the kept part of them."""
    import json

    args = [*tiny_train_args, "--widths", "1.0,0.5", "--width-groups", "global", "--sparsity", "0.5",
            "--adapter-merge", "sparse", "--calibration-samples", "16", "--name", "wp"]
    code, _, err = cli(capsys, "train", *args)
    assert code == 0, err
    run = tmp_path / "runs" / "wp"
    code, out, err = cli(capsys, "export", "--run", str(run), "--subnet", "min", "--format", "merged")
    assert code == 0, err
    manifest = json.loads((run / "exports" / "min-merged" / "manifest.json").read_text())
    name = [n for n in manifest["layers"] if n.endswith("layer.0.output.dense")][0]
    assert manifest["layers"][name]["shape"] == [32, 32]
    from safetensors.torch import load_file

    from supernet.loader import load_run

    mask = load_run(run, weights=False)[0].net.adapters[name].base.mask()[:, :32]  # the 32 kept neurons
    weight = load_file(str(run / "exports" / "min-merged" / "model.safetensors"))[name + ".weight"]
    assert torch.equal(weight != 0, mask)  # exactly the kept part of the base's zeros
    # (less than half: the most important neurons' columns lose fewer weights to Wanda)
    assert 0 < manifest["layers"][name]["sparsity"] < 0.5
