"""Wanda's calibration order: ``sequential`` (block by block through the blocks already pruned, as
the reference ``prune_wanda``) against ``dense`` (every layer's statistics from the unpruned model),
on tiny BERT / Llama / GPT-2 models, through the CLI, and for runs recorded before the option."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_refused, cli, tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import supernet.compressed_base
from supernet import runfiles as runio
from supernet.bases import linear_weight
from supernet.compress.calibration import blocks_in_order
from supernet.compressed_base import MASKS, Compression, compute_masks, masks_fingerprint
from supernet.errors import SupernetError
from supernet.loader import build, config_of_run, load_run
from supernet.network import SuperNetConfig, default_targets, target_layers
from supernet.train import TrainConfig

ORDERS = ("sequential", "dense")


def tiny(arch: str, extra: list[str] | None = None):
    """A tiny model, its target layers (the default block projections, plus ``extra``) and two
    calibration batches, one with padding."""
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForSequenceClassification(tiny_bert_config(num_labels=2, num_hidden_layers=3))
    elif arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=32))
    targets = target_layers(model, SuperNetConfig(target_modules=default_targets(model) + (extra or []), ranks=[4]))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 100, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # padding: left out of the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, targets, batches


def masks_of(arch, order, sparsity=0.5, pattern="unstructured", prune="wanda", extra=None):
    model, targets, batches = tiny(arch, extra)
    comp = Compression(sparsity=sparsity, pattern=pattern, prune=prune, calibration_order=order)
    return compute_masks(model, targets, comp, batches), model, targets, batches


def block_of(name: str) -> int:
    return int(name.split(".")[[i for i, p in enumerate(name.split(".")) if p.isdigit()][0]])


# ------------------------------------------------------------------------------------ the masks
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sequential_masks_have_the_requested_sparsity(arch, pattern):
    masks, *_ = masks_of(arch, "sequential", sparsity=0.0 if pattern != "unstructured" else 0.5, pattern=pattern)
    for name, keep in masks.items():
        rows, width = keep.shape
        if pattern == "unstructured":
            assert (keep.sum(1) == width - width // 2).all(), name
        else:
            assert (keep.reshape(rows, -1, 4).sum(-1) == 2).all(), name


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_first_block_as_dense_later_blocks_differ(arch):
    """Block 0 sees the same inputs in both orders: the same masks bit for bit. Later blocks see
    the pruned blocks' outputs: somewhere their masks must differ."""
    seq, *_ = masks_of(arch, "sequential")
    dense, *_ = masks_of(arch, "dense")
    assert seq.keys() == dense.keys()
    first = [n for n in seq if block_of(n) == 0]
    later = [n for n in seq if block_of(n) > 0]
    assert first and later
    assert all(torch.equal(seq[n], dense[n]) for n in first)
    assert not all(torch.equal(seq[n], dense[n]) for n in later)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_block_is_scored_on_the_pruned_blocks_before_it(arch):
    """Independent check of every block (and a target outside the blocks, BERT's pooler, pruned
    last): a copy of the model with blocks ``< b`` pruned for good, calibrated densely, gives
    block ``b`` the masks the sequential order gave it."""
    extra = ["pooler.dense"] if arch == "bert" else None
    seq, model, targets, batches = masks_of(arch, "sequential", extra=extra)
    blocks = blocks_in_order(targets)
    assert len(blocks) == (4 if extra else 3)
    if extra:
        assert blocks[-1] == ["bert.pooler.dense"]  # outside the blocks: pruned after them
    for b, group in enumerate(blocks):
        pruned = copy.deepcopy(model)
        layers = dict(pruned.named_modules())
        with torch.no_grad():
            for earlier in blocks[:b]:
                for n in earlier:
                    linear_weight(layers[n]).mul_(seq[n])
        ref = compute_masks(pruned, {n: layers[n] for n in group}, Compression(0.5, calibration_order="dense"),
                            batches)
        assert all(torch.equal(ref[n], seq[n]) for n in group), (b, group)


def test_sequential_is_deterministic_and_leaves_the_weights_alone():
    a, model, targets, batches = masks_of("llama", "sequential")
    before = {n: linear_weight(m).clone() for n, m in targets.items()}
    b = compute_masks(model, targets, Compression(0.5, calibration_order="sequential"), batches)
    assert masks_fingerprint(a) == masks_fingerprint(b)
    assert all(torch.equal(before[n], linear_weight(m)) for n, m in targets.items())  # restored afterwards


def test_the_weights_are_restored_when_calibration_fails(monkeypatch):
    _, model, targets, batches = masks_of("gpt2", "dense")  # GPT-2: Conv1D weights, written through a view
    before = {n: linear_weight(m).clone() for n, m in targets.items()}
    real, calls = supernet.compressed_base.prune_mask, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 5:  # block 0 (4 layers) already pruned
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(supernet.compressed_base, "prune_mask", failing)
    with pytest.raises(RuntimeError, match="boom"):
        compute_masks(model, targets, Compression(0.5, calibration_order="sequential"), batches)
    assert all(torch.equal(before[n], linear_weight(m)) for n, m in targets.items())


def test_magnitude_needs_no_calibration_in_either_order():
    model, targets, _ = tiny("llama")
    masks = [compute_masks(model, targets, Compression(0.5, prune="magnitude", calibration_order=o), None)
             for o in ORDERS]
    assert masks_fingerprint(masks[0]) == masks_fingerprint(masks[1])


def test_blocks_in_order():
    names = ["enc.layer.0.q", "enc.layer.0.k", "enc.layer.1.q", "pooler", "dec.layers.0.q", "enc.layer.10.q",
             "head"]
    assert blocks_in_order(names) == [["enc.layer.0.q", "enc.layer.0.k"], ["enc.layer.1.q"], ["dec.layers.0.q"],
                                      ["enc.layer.10.q"], ["pooler", "head"]]
    assert blocks_in_order(["model.layers.2.mlp.experts.3.w1", "model.layers.2.mlp.experts.4.w1"]) == [
        ["model.layers.2.mlp.experts.3.w1", "model.layers.2.mlp.experts.4.w1"]]


# ------------------------------------------------------------------------------------ options and runs
def test_a_bad_order_is_refused_in_one_line(capsys, tiny_train_args, tmp_path):
    code, _, err = cli(capsys, "train", *tiny_train_args, "--sparsity", "0.5", "--calibration-order", "random")
    assert_refused(code, err, "--calibration-order")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("calibration-order: backwards\nsparsity: 0.5\n")
    code, _, err = cli(capsys, "train", "--config", cfg, *tiny_train_args)
    assert_refused(code, err, "unknown --calibration-order 'backwards'; choose one of sequential, dense")
    for bad in ("Dense", 3, ""):
        with pytest.raises(SupernetError, match="calibration-order") as e:
            TrainConfig(calibration_order=bad)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_new_runs_default_to_the_measured_better_order():
    """dense: a tie in accuracy, 0.002 closer to the dense model's outputs (results/wanda_order.md)."""
    assert TrainConfig().calibration_order == "dense" == Compression().calibration_order


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_both_orders_through_the_cli(capsys, arch, tiny_bert_dir, tiny_llama_dir, tiny_csv, tmp_path):
    model = tiny_bert_dir if arch == "bert" else tiny_llama_dir
    args = ["--model", model, "--dataset", tiny_csv, "--text-column", "sentence", "--label-column", "sentiment",
            "--ranks", "4,2", "--max-steps", "2", "--batch-size", "8", "--eval-every", "2", "--save-every", "2",
            "--eval-samples", "8", "--max-length", "16", "--out", tmp_path, "--sparsity", "0.5",
            "--calibration-samples", "32"]
    prints = {}
    for order in ORDERS:
        code, _, err = cli(capsys, "train", *args, "--calibration-order", order, "--name", order)
        assert code == 0, err
        record = runio.read_run_config(tmp_path / order)
        assert record["train"]["calibration_order"] == order
        prints[order] = record["bases"]["masks_sha256"]
        setup, _ = load_run(tmp_path / order)
        for ad in setup.net.adapters.values():
            keep = ad.base.mask()
            assert (keep.sum(1) == keep.shape[1] // 2).all()
    assert prints["sequential"] != prints["dense"]


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory, tiny_bert_dir, tiny_csv):
    """A dense-order Wanda run whose config.json is then stripped of the option, as a run written
    before it existed."""
    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(model=str(tiny_bert_dir), dataset=str(tiny_csv), text_column="sentence",
                      label_column="sentiment", ranks=[4, 2], batch_size=8, max_length=16, eval_samples=8,
                      eval_every=2, save_every=2, max_steps=2, out=str(out), name="old", sparsity=0.5,
                      calibration_samples=32, calibration_order="dense")
    from supernet.train import train

    train(cfg)
    path = out / "old" / runio.CONFIG
    record = json.loads(path.read_text())
    del record["train"]["calibration_order"]
    path.write_text(json.dumps(record))
    return out / "old"


def test_an_old_run_loads_and_recalibrates_to_its_own_masks(legacy_run):
    record = runio.read_run_config(legacy_run)
    assert "calibration_order" not in record["train"]
    cfg = config_of_run(record)
    assert cfg.calibration_order == "dense"  # the only order there was
    setup, _ = load_run(legacy_run)  # masks read back and checked against the recorded fingerprint
    assert masks_fingerprint(setup.masks) == record["bases"]["masks_sha256"]
    # calibrating again from the recorded options gives the very masks the run was built with
    assert masks_fingerprint(build(cfg).masks) == record["bases"]["masks_sha256"]
    assert masks_fingerprint(build(TrainConfig(**{**vars(cfg), "calibration_order": "sequential"})).masks) != \
        record["bases"]["masks_sha256"]
    assert (legacy_run / MASKS).is_file()


def test_an_old_run_resumes_with_its_order(capsys, legacy_run):
    code, _, err = cli(capsys, "train", "--resume", legacy_run, "--max-steps", "3")
    assert code == 0, err
    assert runio.read_run_config(legacy_run)["train"]["calibration_order"] == "dense"  # now recorded
