"""Compressed bases end to end: runs that record and rebuild them, merges and compressed-tensors
exports that keep exactly their zeros and integers, costs, and every bad input refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_refused, cli, tiny_bert_config, tiny_llama_config
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from supernet import runfiles
from supernet.bases import QuantizedBase, linear_weight
from supernet.cli import main
from supernet.compress.ct import load_compressed
from supernet.compress.quant import dequantize
from supernet.compressed_base import MASKS, Compression, compute_masks, make_bases
from supernet.errors import SupernetError
from supernet.export import check_format, export_compressed, export_merged, export_peft
from supernet.loader import load_run
from supernet.network import SuperNetConfig, SuperNetwork, default_targets, target_layers
from supernet.tasks import collate, rows_of


def compressed_net(arch: str, merge: str, bits: int | None = None, sparsity: float = 0.5,
                   pattern: str = "unstructured") -> SuperNetwork:
    """A tiny super-network on a magnitude-pruned and/or quantised base, ``lora_B`` randomised."""
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
        cfg = SuperNetConfig(target_modules=default_targets(model), ranks=[8, 4, 2], alpha=12.0, merge=merge,
                             trainable_modules=["classifier"])
    elif arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config())
        cfg = SuperNetConfig(target_modules=default_targets(model), ranks=[8, 4, 2], alpha=12.0, merge=merge)
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32))
        cfg = SuperNetConfig(target_modules=default_targets(model), ranks=[8, 4, 2], alpha=12.0, merge=merge)
    comp = Compression(sparsity=sparsity, prune="magnitude", pattern=pattern, bits=bits, group_size=16)
    targets = target_layers(model, cfg)
    masks = compute_masks(model, targets, comp, None) if comp.prunes else None
    net = SuperNetwork(model.eval(), cfg, make_bases(targets, masks, comp, merge))
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.05)
    return net


def inputs(net, seed=1):
    ids = torch.randint(0, net.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_at(net, cfg, batch):
    net.activate(cfg)
    with torch.no_grad():
        return net.model(**batch).logits


MID = "mid"


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_sparsepeft_merged_export_keeps_exactly_the_base_zeros(arch, tmp_path):
    net = compressed_net(arch, "sparse")
    cfg = net.mid_config()
    export_merged(net, cfg, tmp_path / "m", batches=[inputs(net)])
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "m")
    for name, ad in net.adapters.items():
        w = linear_weight(loaded.get_submodule(name))  # Conv1D: transposed back to (out, in)
        assert torch.equal(w != 0, ad.base.mask())  # count and positions
    net.activate(cfg)
    assert (logits_at(net, cfg, inputs(net)) - logits_at(net, net.min_config(), inputs(net))).abs().max() > 1e-4
    layers = json.loads((tmp_path / "m" / "manifest.json").read_text())["layers"]
    assert all(v["sparsity"] == 0.5 for v in layers.values())  # width 32 or 64: exactly half of each row


def test_plain_merge_on_a_pruned_base_densifies(tmp_path):
    """What PEFT does today, and what the table's 'naive' row measures."""
    net = compressed_net("bert", "plain")
    manifest = export_merged(net, net.max_config(), tmp_path / "m", batches=[inputs(net)])
    assert manifest["adapted_layers"]["sparsity"] < 0.01


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("bits", [4, 8])
def test_qa_sparsepeft_compressed_export_stores_the_trained_integers(arch, bits, tmp_path):
    net = compressed_net(arch, "qa-sparse", bits=bits)
    cfg = net.mid_config()
    manifest = export_compressed(net, cfg, tmp_path / "c", batches=[inputs(net)])
    # stock transformers loads it as it is (config.json asks it to dequantize), no supernet code in the loop
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["dequantize"] is True
    assert not qc.get("sparsity_config")  # vLLM refuses a checkpoint with one; the zeros live in the integers
    net.activate(cfg)
    moved = 0
    for name, ad in net.adapters.items():
        base: QuantizedBase = ad.base
        q = base.integers(ad.delta_weight().detach())
        assert torch.equal(linear_weight(loaded.get_submodule(name)), dequantize(q, base.scale, base.zero, 16))
        assert (q[~base.mask()] == base.zero.repeat_interleave(16, 1)[~base.mask()]).all()  # pruned = z = 0.0
        moved += int((q != base.qweight).sum())
    assert moved > 0  # the adapter changed integers: the test would notice an export of the base alone
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(net)).logits, logits_at(net, cfg, inputs(net)))
    # bytes: the manifest's accounting is what the file holds for those layers
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(f"{n}.{k}").nbytes for n in net.adapters
                     for k in ("weight_packed", "weight_scale", "weight_zero_point"))
        assert not any(k == f"{n}.weight" for k in f.keys() for n in net.adapters)
    assert manifest["adapted_layers"]["bytes"] == stored
    fp32 = sum(ad.in_features * ad.out_features * 4 for ad in net.adapters.values())
    assert stored / fp32 < (0.30 if bits == 4 else 0.55)
    assert manifest["compressed_format"] == "pack-quantized" and manifest["verification"]["weights_exact"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparse_bitmask_export_round_trips(pattern, tmp_path):
    net = compressed_net("llama", "sparse", pattern=pattern)
    cfg = net.max_config()
    manifest = export_compressed(net, cfg, tmp_path / "c", batches=[inputs(net)], sparse_storage="bitmask")
    assert manifest["compressed_format"] == "sparse-bitmask" and "load_compressed" in manifest["loader"]
    loaded = load_compressed(tmp_path / "c")
    net.activate(cfg)
    for name, ad in net.adapters.items():
        w = linear_weight(loaded.get_submodule(name))
        assert torch.equal(w, ad.merged_weight().detach())
        if pattern == "2:4":
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(f"{n}.{k}").nbytes for n in net.adapters
                     for k in ("compressed", "bitmask", "row_offsets"))
    assert manifest["adapted_layers"]["bytes"] == stored
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["sparsity_structure"] == pattern
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(net)).logits, logits_at(net, cfg, inputs(net)))


def test_pruned_float_layers_are_stored_dense_by_default_for_stock_loaders(tmp_path):
    """No sparsity_config by default: a plain checkpoint whose zeros are the base's, which stock
    transformers and vLLM load as it is."""
    net = compressed_net("llama", "sparse", pattern="2:4")
    cfg = net.mid_config()
    manifest = export_compressed(net, cfg, tmp_path / "c", batches=[inputs(net)])
    assert manifest["compressed_format"] == "dense" and "vLLM" in manifest["loader"]
    assert "quantization_config" not in json.loads((tmp_path / "c" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    net.activate(cfg)
    for name, ad in net.adapters.items():
        w = linear_weight(loaded.get_submodule(name))
        assert torch.equal(w, ad.merged_weight().detach()) and torch.equal(w != 0, ad.base.mask())
    assert manifest["adapted_layers"]["sparsity"] == 0.5
    with torch.no_grad():
        assert torch.equal(loaded(**inputs(net)).logits, logits_at(net, cfg, inputs(net)))
    with pytest.raises(SupernetError, match="unknown --sparse-storage"):
        export_compressed(net, cfg, tmp_path / "x", sparse_storage="csr")
    assert not (tmp_path / "x").exists()


def test_formats_a_run_cannot_produce_are_refused(tmp_path):
    cases = [(compressed_net("bert", "sparse"), "peft", "masked by the base"),
             (compressed_net("bert", "plain"), "peft", "original dense model"),
             (compressed_net("bert", "plain"), "compressed", "makes it dense again"),
             (compressed_net("bert", "plain", sparsity=0.0, bits=None), "compressed", "base is dense"),
             (compressed_net("gpt2", "sparse"), "compressed", "nn.Linear layers only")]
    for net, fmt, message in cases:
        with pytest.raises(SupernetError, match=message):
            check_format(net, fmt)
    with pytest.raises(SupernetError, match="masked by the base"):
        export_peft(cases[0][0], cases[0][0].max_config(), tmp_path / "p")
    with pytest.raises(SupernetError, match="makes it dense again"):
        export_compressed(cases[2][0], cases[2][0].max_config(), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_costs_count_the_compressed_base():
    dense = compressed_net("bert", "plain", sparsity=0.0)
    sparse = compressed_net("bert", "sparse")
    cfg = dense.max_config()
    rows = 16  # every block projection sees all 16 tokens
    zeros = sum(int((~ad.base.mask()).sum()) for ad in sparse.adapters.values())
    adapters = sum(ad.adapter_macs_per_token(8) for ad in dense.adapters.values())
    # the sparse base costs its non-zeros; a SparsePEFT update is folded in, so no adapter MACs either
    assert dense.macs(cfg, rows) - sparse.macs(cfg, rows) == rows * (zeros + adapters)
    int4 = compressed_net("bert", "qa-sparse", bits=4)
    assert int4.size(cfg) < sparse.size(cfg) < dense.size(cfg)
    assert int4.size(cfg) - sum(ad.base.nbytes() for ad in int4.adapters.values()) == \
        dense.size(cfg, merged=True) - sum(ad.nbytes(8, merged=True) for ad in dense.adapters.values())


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_bert_dir, tiny_csv):
    """A short QA-SparsePEFT run: Wanda 2:4 base quantised to INT4 (group 16)."""
    out = tmp_path_factory.mktemp("runs")
    code = main(["train", "--model", str(tiny_bert_dir), "--dataset", str(tiny_csv), "--text-column", "sentence",
                 "--label-column", "sentiment", "--ranks", "8,4", "--max-steps", "10", "--batch-size", "8",
                 "--eval-every", "10", "--save-every", "10", "--eval-samples", "16", "--max-length", "16",
                 "--lr", "1e-2", "--out", str(out), "--name", "qa", "--pattern", "2:4", "--bits", "4",
                 "--group-size", "16", "--adapter-merge", "qa-sparse", "--calibration-samples", "32"])
    assert code == 0
    return out / "qa"


def test_a_compressed_run_records_and_rebuilds_its_base(qa_run, tmp_path, monkeypatch):
    record = json.loads((qa_run / "config.json").read_text())
    assert record["train"]["bits"] == 4 and record["train"]["pattern"] == "2:4"
    assert record["bases"]["kind"] == "quantized" and record["bases"]["merge"] == "qa-sparse"
    assert record["bases"]["sparsity"] >= 0.5
    assert (qa_run / MASKS).is_file()
    setup, _ = load_run(qa_run)
    for ad in setup.net.adapters.values():
        keep = ad.base.mask()
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()  # 2:4 exactly
    # the base is rebuilt from the saved masks, never calibrated again: another valid mask file is followed
    import shutil

    import supernet.loader
    from supernet.compressed_base import save_masks

    copy = tmp_path / "copy"
    shutil.copytree(qa_run, copy)
    other = {n: torch.rand(a.out_features, a.in_features) < 0.3 for n, a in setup.net.adapters.items()}
    record = json.loads((copy / "config.json").read_text())  # recorded as the run's own masks
    record["bases"]["masks_sha256"] = save_masks(copy / MASKS, other)
    (copy / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(supernet.loader, "compute_masks", lambda *a, **k: pytest.fail("calibrated again"))
    rebuilt, _ = load_run(copy)
    assert all(torch.equal(rebuilt.net.adapters[n].base.mask(), m) for n, m in other.items())
    with safe_open(str(copy / MASKS), "pt") as f:  # a file of the wrong width is refused, not padded
        meta = f.metadata()
        narrow = {n: f.get_tensor(n)[:, :-1].contiguous() for n in f.keys()}
    runfiles.save_tensors(copy / MASKS, narrow, metadata=meta)
    with pytest.raises(SupernetError, match="mask of"):
        load_run(copy)


STOCK_PREDICT = """
import sys, torch, pandas as pd
from transformers import AutoModelForSequenceClassification
m = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    logits = m(**batch).logits
assert not any(k.startswith("supernet") for k in sys.modules)
pd.DataFrame(logits.numpy()).to_csv(sys.argv[3], index=False)
"""


def test_qa_export_loads_in_a_fresh_stock_process_and_predicts_as_eval(capsys, qa_run, tmp_path):
    """The default compressed export of a QA-SparsePEFT run, loaded by stock transformers alone in
    a fresh interpreter, gives ``supernet eval --predictions``' logits and predictions."""
    preds = tmp_path / "pred.csv"
    code, out, err = cli(capsys, "eval", "--run", qa_run, "--subnet", "mid", "--split", "validation",
                         "--predictions", preds)
    assert code == 0, err
    trained = json.loads(out.strip().splitlines()[-1])
    code, _, err = cli(capsys, "export", "--run", qa_run, "--subnet", "mid", "--format", "compressed",
                       "--out", tmp_path / "c")
    assert code == 0, err
    setup, _ = load_run(qa_run, weights=False)
    ds = setup.enc.splits["validation"]
    batch = collate(setup.enc, rows_of(ds, range(len(ds))))
    torch.save({k: v for k, v in batch.items() if k != "labels"}, tmp_path / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", STOCK_PREDICT, str(tmp_path / "c"), str(tmp_path / "batch.pt"),
                           str(tmp_path / "stock.csv")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock = pd.read_csv(tmp_path / "stock.csv").to_numpy()
    ours = pd.read_csv(preds)
    assert len(ours) == len(stock) == trained["examples"]
    np.testing.assert_allclose(stock, ours.filter(like="logit_").to_numpy(), atol=1e-5, rtol=0)
    names = list(setup.label_names)
    assert [names[i] for i in stock.argmax(1)] == ours["prediction"].tolist()
    assert (ours["prediction"] == ours["label"]).mean() == pytest.approx(trained["accuracy"])


def test_format_refusals_and_damaged_masks_from_the_cli(capsys, qa_run, tmp_path):
    code, _, err = cli(capsys, "export", "--run", qa_run, "--subnet", "max", "--format", "peft",
                       "--out", tmp_path / "p")
    assert_refused(code, err, "cannot be exported as --format peft")
    assert not (tmp_path / "p").exists()
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(qa_run, broken)
    (broken / MASKS).write_bytes((qa_run / MASKS).read_bytes()[:40])
    assert_refused(*cli(capsys, "eval", "--run", broken)[::2], "cannot read")
    (broken / MASKS).unlink()
    assert_refused(*cli(capsys, "eval", "--run", broken)[::2], "is missing")


def test_search_sees_the_compressed_size(capsys, qa_run):
    code, _, err = cli(capsys, "search", "--run", qa_run, "--objectives", "acc,size", "--population", "4",
                       "--evaluations", "4", "--eval-samples", "16", "--name", "sz")
    assert code == 0, err
    import pandas as pd

    hist = pd.read_csv(qa_run / "search" / "sz" / "history.csv")
    setup, _ = load_run(qa_run)
    cfg = json.loads(hist["config"].iloc[0])
    assert hist["size"].iloc[0] == setup.net.size(cfg)
    assert hist["size"].nunique() == 1  # QA-SparsePEFT ships integers only, whatever the ranks


def test_a_compressed_run_resumes_exactly(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    """The resumed run rebuilds its base from the saved masks and ends with the uninterrupted weights."""
    from supernet.train import TrainConfig, resume, train

    def cfg(name):
        return TrainConfig(model=str(tiny_bert_dir), dataset=str(tiny_csv), text_column="sentence",
                           label_column="sentiment", ranks=[8, 4], batch_size=8, max_length=16, eval_samples=16,
                           eval_every=4, save_every=4, max_steps=8, lr=1e-2, out=str(tmp_path), name=name,
                           sparsity=0.5, bits=8, group_size=16, adapter_merge="qa-sparse", calibration_samples=32)

    train(cfg("full"))

    class Crash(RuntimeError):
        pass

    def crash(step, trainer):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(cfg("broken"), on_step=crash)
    import supernet.loader

    monkeypatch.setattr(supernet.loader, "compute_masks", lambda *a, **k: pytest.fail("calibrated again"))
    resume(tmp_path / "broken")
    a = runfiles.load_tensors(tmp_path / "full" / runfiles.ADAPTER)
    b = runfiles.load_tensors(tmp_path / "broken" / runfiles.ADAPTER)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / MASKS).read_bytes() == (tmp_path / "broken" / MASKS).read_bytes()


def test_masks_of_another_run_are_refused(capsys, tiny_train_args, tmp_path):
    """A ``compression.safetensors`` copied from another run is refused by eval and --resume; a run
    recorded before fingerprints existed (none in its config.json) still loads its masks."""
    import shutil

    def pruned(name, *extra):
        code, _, err = cli(capsys, "train", *tiny_train_args, "--name", name, "--sparsity", "0.5", "--max-steps",
                           "2", "--eval-every", "2", "--save-every", "2", *extra)
        assert code == 0, err
        return tmp_path / "runs" / name

    a = pruned("a", "--prune", "magnitude")
    b = pruned("b", "--prune", "wanda", "--calibration-samples", "16")
    with safe_open(str(a / MASKS), "pt") as fa, safe_open(str(b / MASKS), "pt") as fb:
        assert fa.keys() == fb.keys()
        assert any(not torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in fa.keys())  # really other masks
    code, out, err = cli(capsys, "eval", "--run", a, "--split", "validation")
    assert code == 0, err
    own = json.loads(out.strip().splitlines()[-1])

    mine = (a / MASKS).read_bytes()
    shutil.copy(b / MASKS, a / MASKS)
    for argv in (["eval", "--run", a], ["train", "--resume", a, "--max-steps", "4"]):
        code, _, err = cli(capsys, *argv)
        assert_refused(code, err, "does not belong to this run")
        assert MASKS in err
    assert json.loads((a / runfiles.CHECKPOINT / "state.json").read_text())["step"] == 2  # nothing trained

    # a run written before fingerprints were recorded: no check possible, its masks load as they are
    (a / MASKS).write_bytes(mine)
    record = json.loads((a / "config.json").read_text())
    fingerprints = [k for k in record["bases"] if "mask" in k]
    assert fingerprints
    for k in fingerprints:
        del record["bases"][k]
    (a / "config.json").write_text(json.dumps(record))
    code, out, err = cli(capsys, "eval", "--run", a, "--split", "validation")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == own
    code, _, err = cli(capsys, "train", "--resume", a, "--max-steps", "4")
    assert code == 0, err
    assert all(k in json.loads((a / "config.json").read_text())["bases"] for k in fingerprints)  # recorded now
