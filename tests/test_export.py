"""Exporting a sub-network: merged transformers model and stock PEFT LoRA adapter, both self-verified."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from supernet.adapters import ElasticLoRA
from supernet.errors import SupernetError
from supernet.export import (
    MANIFEST,
    MARKER,
    SUBNET,
    base_model_copy,
    export,
    export_merged,
    export_peft,
    merge_lora,
    merged_model,
    pattern_keys,
)
from supernet.network import SuperNetConfig, SuperNetwork, default_targets

VOCAB = 30522
ARCHS = ("bert", "llama", "gpt2")


def make_net(arch: str, scaling: str = "lora", layers: int = 2, ranks=(8, 4, 2)) -> SuperNetwork:
    """A tiny super-network with randomised ``lora_B`` (it starts at zero, which would hide bugs)."""
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForSequenceClassification(tiny_bert_config(num_labels=3, num_hidden_layers=layers))
        cfg = SuperNetConfig(target_modules=["query", "key", "value", "dense"], ranks=list(ranks),
                             scaling=scaling, alpha=12.0, trainable_modules=["classifier"])
    elif arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=layers))
        cfg = SuperNetConfig(target_modules=default_targets(model), ranks=list(ranks), scaling=scaling, alpha=12.0)
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        cfg = SuperNetConfig(target_modules=default_targets(model), ranks=list(ranks), scaling=scaling, alpha=12.0)
    net = SuperNetwork(model.eval(), cfg)
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.5)
        for name in net.head_modules:
            for p in net.model.get_submodule(name).parameters():
                p.normal_(std=0.5)
    return net


def mixed_config(net: SuperNetwork) -> dict[str, int]:
    """Different ranks in different groups (so that a single PEFT ``r`` would be wrong)."""
    cfg = {g: c[i % len(c)] for i, (g, c) in enumerate(net.space.choices.items())}
    assert len(set(cfg.values())) > 1
    return cfg


def batch(net: SuperNetwork, seed: int = 1) -> dict[str, torch.Tensor]:
    vocab = net.model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_at(net: SuperNetwork, cfg, inputs) -> torch.Tensor:
    prev = net.active_config()
    net.activate(cfg)
    with torch.no_grad():
        out = net.model(**inputs).logits
    net.activate(prev)
    return out


def plain_base(net: SuperNetwork, zero_heads: bool = True) -> nn.Module:
    """The original model rebuilt by hand from the super-network's state dict (``.base`` layers, no ``lora_``)."""
    model = type(net.model)(net.model.config).eval()
    state = {k.replace(".base.layer.", "."): v for k, v in net.model.state_dict().items() if "lora_" not in k}
    model.load_state_dict(state)
    if zero_heads:  # a stock base has an untrained head: the PEFT export must bring it
        with torch.no_grad():
            for name in net.head_modules:
                for p in model.get_submodule(name).parameters():
                    p.zero_()
    return model


def auto_class(arch: str):
    return AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM


# ----------------------------------------------------------------------------- merged
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_equals_supernet_and_is_plain(arch, tmp_path):
    net = make_net(arch)
    cfg = mixed_config(net)
    inputs = batch(net)
    out = tmp_path / "merged"
    manifest = export_merged(net, cfg, out, batches=[inputs], macs=1234, metadata={"val_accuracy": 0.75})

    loaded = auto_class(arch).from_pretrained(out).eval()
    assert type(loaded) is type(net.model)
    assert not any(isinstance(m, ElasticLoRA) for m in loaded.modules())
    keys = set(loaded.state_dict())
    assert not any("lora_" in k or ".base." in k for k in keys)
    assert keys == set(type(net.model)(net.model.config).state_dict())  # the original model's keys
    with torch.no_grad():
        theirs = loaded(**inputs).logits
    ours = logits_at(net, cfg, inputs)
    assert (theirs - ours).abs().max() <= 1e-4
    assert not torch.allclose(ours, logits_at(net, net.max_config(), inputs), atol=1e-3)  # the config matters

    assert json.loads((out / SUBNET).read_text()) == cfg
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk[MARKER] == 1 and on_disk["format"] == "merged" and on_disk["config"] == cfg
    assert on_disk["macs"] == 1234 and on_disk["metadata"] == {"val_accuracy": 0.75}
    assert on_disk["trainable_params"] == net.trainable_params(cfg)
    assert on_disk["shipped_params"] == sum(p.numel() for p in loaded.parameters())
    assert on_disk["verification"]["max_abs_diff"] <= on_disk["verification"]["tolerance"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging directory left


def test_merge_orientation_square_conv1d():
    torch.manual_seed(0)
    base = Conv1D(8, 8)  # (in, out) storage; square, so a wrong transpose would still fit
    ad = ElasticLoRA(copy.deepcopy(base), max_rank=4, alpha=8.0)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad.set_active(3)
    layer = copy.deepcopy(base)
    merge_lora(ad, layer)
    torch.testing.assert_close(layer.weight - base.weight, ad.delta_weight().detach().t())
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), ad(x).detach(), atol=1e-5, rtol=1e-5)


def test_merged_model_leaves_supernet_usable():
    net = make_net("gpt2")
    inputs = batch(net)
    cfg = mixed_config(net)
    model = merged_model(net, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits_at(net, cfg, inputs), atol=1e-4, rtol=0)
        assert not torch.allclose(model(**inputs).logits, plain_base(net)(**inputs).logits, atol=1e-3)
    assert net.active_config() == net.max_config()


# ----------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling", ["lora", "rora", "fixed"])
@pytest.mark.parametrize("layout", ["folded", "pattern"])
def test_peft_export_loads_in_stock_peft_and_matches(arch, scaling, layout, tmp_path):
    from peft import PeftModel

    net = make_net(arch, scaling=scaling)
    cfg = mixed_config(net)
    inputs = batch(net)
    out = tmp_path / "peft"
    manifest = export_peft(net, cfg, out, batches=[inputs], scale=layout)

    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    ranks = {n: cfg[g] for g, names in net.groups.items() for n in names}
    assert adapter_cfg["rank_pattern"] == ranks  # full module names, one rank each
    assert sorted(adapter_cfg["target_modules"]) == sorted(net.adapters)
    assert adapter_cfg["use_rslora"] == (scaling == "rora" and layout == "pattern")
    assert adapter_cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 12.0
    if arch == "bert":
        assert "classifier" in adapter_cfg["modules_to_save"] and adapter_cfg["task_type"] == "SEQ_CLS"
    if scaling == "fixed" or layout == "folded":  # one scale, 12 / 8, for every module
        assert adapter_cfg["alpha_pattern"] == pytest.approx({n: 12.0 * r / 8 for n, r in ranks.items()})
    assert manifest["vllm"]["scale"] == layout and manifest["vllm"]["max_lora_rank"] == 8

    loaded = PeftModel.from_pretrained(plain_base(net), str(out)).eval()
    with torch.no_grad():
        theirs = loaded(**inputs).logits
    ours = logits_at(net, cfg, inputs)
    assert (theirs - ours).abs().max() <= 1e-4
    assert not torch.allclose(ours, logits_at(net, net.max_config(), inputs), atol=1e-3)
    with torch.no_grad():  # and PEFT's own merge agrees (fan_in_fan_out for Conv1D)
        merged = loaded.merge_and_unload()(**inputs).logits
    assert (merged - ours).abs().max() <= 1e-4

    assert manifest["format"] == "peft" and manifest["trainable_params"] == net.trainable_params(cfg)
    assert manifest["shipped_params"] == net.trainable_params(cfg)  # sliced factors + head, nothing else
    assert json.loads((out / SUBNET).read_text()) == cfg


def test_peft_many_layers_mixed_ranks_no_pattern_collision(tmp_path):
    """``layer.1.`` must not pick up the rank of ``layer.11.`` (PEFT's pattern keys are regex suffix matches)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    net = make_net("bert", layers=12, ranks=(8, 4, 2))
    cfg = {g: (8 if g.startswith("L1.") else 2 if g.startswith("L11.") else 4) for g in net.groups}
    inputs = batch(net)
    export_peft(net, cfg, tmp_path / "p", batches=[inputs])
    loaded = PeftModel.from_pretrained(plain_base(net), str(tmp_path / "p")).eval()
    got = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert got == {n: cfg[g] for g, names in net.groups.items() for n in names}
    assert got["bert.encoder.layer.1.attention.self.query"] == 8
    assert got["bert.encoder.layer.11.attention.self.query"] == 2
    with torch.no_grad():
        assert (loaded(**inputs).logits - logits_at(net, cfg, inputs)).abs().max() <= 1e-4


class Toy(nn.Module):
    """Names built to trip PEFT's matching: ``a.b`` vs ``axb`` (a regex dot), ``outer.a.b`` (an untargeted suffix
    match), ``c.d`` vs ``outer.c.d`` (one target a dotted suffix of another)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.a, self.c, self.outer = nn.Module(), nn.Module(), nn.Module()
        self.outer.a, self.outer.c = nn.Module(), nn.Module()
        self.a.b, self.axb, self.outer.a.b = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.c.d, self.outer.c.d = nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        layers = (self.a.b, self.axb, self.outer.a.b, self.c.d, self.outer.c.d)
        return self.head(sum(torch.tanh(layer(h)) for layer in layers))


def test_pattern_keys_are_resolved_exactly_by_peft():
    from peft.utils.other import get_pattern_key

    cases = [
        ({"x.layer.1.q": 2, "x.layer.11.q": 4}, {"x.layer.1.q": 2, "x.layer.11.q": 4}),  # plain names suffice
        ({"a.b": 2, "axb": 4}, {"a\\.b": 2, "axb": 4}),  # a plain "a.b" would match "axb"
        ({"c.d": 2, "outer.c.d": 4}, {"^c\\.d": 2, "^outer\\.c\\.d": 4}),  # "c.d" would match "outer.c.d"
    ]
    for values, expected in cases:
        keys = pattern_keys(values)
        assert keys == expected
        for order in (list(keys), list(reversed(keys))):  # whatever order adapter_config.json has
            assert {n: keys[get_pattern_key(order, n)] for n in values} == values


def test_peft_export_of_colliding_names(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    net = SuperNetwork(Toy().eval(), SuperNetConfig(target_modules=["re:a\\.b", "axb", "c.d"], ranks=[8, 4, 2],
                                                    groups="module", trainable_modules=["head"]))
    assert sorted(net.adapters) == ["a.b", "axb", "c.d", "outer.c.d"]  # outer.a.b stays a plain layer
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.5)
    cfg = {"a.b": 8, "axb": 4, "c.d": 2, "outer.c.d": 8}
    ids = torch.randint(0, 50, (2, 6))
    export_peft(net, cfg, tmp_path / "p", batches=[{"input_ids": ids}])
    adapter_cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert isinstance(adapter_cfg["target_modules"], str)  # a list entry "a.b" would also adapt outer.a.b
    fresh = Toy()
    state = net.model.state_dict()
    fresh.load_state_dict({k.replace(".base.layer.", "."): v for k, v in state.items() if "lora_" not in k})
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "p")).eval()
    got = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert got == cfg
    net.activate(cfg)
    with torch.no_grad():
        assert (loaded(input_ids=ids) - net.model(input_ids=ids)).abs().max() <= 1e-4
    with pytest.raises(SupernetError, match="transformers model"):
        export_merged(net, cfg, tmp_path / "m", batches=[{"input_ids": ids}])
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- safety
def test_supernet_unchanged_after_export(tmp_path):
    net = make_net("bert", scaling="fixed")
    inputs = batch(net)
    start = net.min_config()
    net.activate(start)
    net.model.train()
    state = {k: v.clone() for k, v in net.model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in net.model.named_parameters()}
    cfg = mixed_config(net)
    export_merged(net, cfg, tmp_path / "m", batches=[inputs])
    export_peft(net, cfg, tmp_path / "p", batches=[inputs])
    assert net.active_config() == start and net.model.training
    after = net.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in net.model.named_parameters()} == grads
    assert all(isinstance(net.model.get_submodule(n), ElasticLoRA) for n in net.adapters)
    net.model.eval()
    for c in (net.max_config(), cfg):  # still a working super-network at any config
        ref = merged_model(net, c)
        with torch.no_grad():
            assert (ref(**inputs).logits - logits_at(net, c, inputs)).abs().max() <= 1e-4


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_nan_adapter_refused_and_nothing_written(fmt, tmp_path):
    net = make_net("llama")
    cfg = mixed_config(net)
    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        net.adapters[name].lora_B[0, 0] = float("nan")  # column 0 is inside every rank
    with pytest.raises(SupernetError, match=name.replace(".", r"\.")) as err:
        export(net, cfg, tmp_path / "deep" / "er" / "out", fmt=fmt, batches=[batch(net)])
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory, no parents we made


@pytest.mark.parametrize("fmt", ["merged", "peft"])
def test_failed_verification_leaves_nothing(fmt, tmp_path, monkeypatch):
    import supernet.export_core as ex

    net = make_net("gpt2")
    monkeypatch.setattr(ex, "TOLERANCE", {torch.float32: -1.0})  # no export can pass
    with pytest.raises(SupernetError, match="differs from the super-network"):
        export(net, net.min_config(), tmp_path / "out", fmt=fmt, batches=[batch(net)])
    assert list(tmp_path.iterdir()) == []


def test_existing_directories(tmp_path):
    net = make_net("bert")
    cfg = net.min_config()
    inputs = [batch(net)]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for fmt in ("merged", "peft"):
        with pytest.raises(SupernetError, match="not a supernet export"):
            export(net, cfg, foreign, fmt=fmt, batches=inputs)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SupernetError, match="exists and is not a folder"):
        export_merged(net, cfg, a_file, batches=inputs)
    assert a_file.read_text() == "x"

    empty = tmp_path / "empty"
    empty.mkdir()
    export_merged(net, cfg, empty, batches=inputs)  # an empty directory is fine
    with pytest.raises(SupernetError, match="overwrite"):
        export_peft(net, cfg, empty, batches=inputs)
    assert json.loads((empty / MANIFEST).read_text())["format"] == "merged"
    export_peft(net, cfg, empty, batches=inputs, overwrite=True)
    assert json.loads((empty / MANIFEST).read_text())["format"] == "peft"
    assert not (empty / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "mine"]


def test_bad_arguments(tmp_path):
    net = make_net("bert")
    with pytest.raises(SupernetError):
        export_merged(net, {"L0.qkv": 3}, tmp_path / "x")
    with pytest.raises(SupernetError, match="format"):
        export(net, net.max_config(), tmp_path / "x", fmt="onnx")
    with pytest.raises(SupernetError, match="JSON"):
        export_peft(net, net.max_config(), tmp_path / "x", metadata={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_base_model_copy_is_the_original_model():
    net = make_net("gpt2")
    base = base_model_copy(net)
    ref = plain_base(net, zero_heads=False)
    assert not any(isinstance(m, ElasticLoRA) for m in base.modules())
    assert base.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in base.state_dict().items())
    assert base.lm_head.weight is base.transformer.wte.weight  # ties survive the copy
    assert base.transformer.h[0].attn.c_attn.weight is not net.adapters["transformer.h.0.attn.c_attn"].base.layer.weight


# ----------------------------------------------------------------------------- stock loading, no supernet
STOCK_LOADER = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
base, merged, adapter, ids = sys.argv[1:5]
ids = torch.tensor(json.loads(ids))
tok = AutoTokenizer.from_pretrained(merged)
m = AutoModelForSequenceClassification.from_pretrained(merged).eval()
p = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), adapter).eval()
assert not any(k.startswith("supernet") for k in sys.modules)
with torch.no_grad():
    out = {"merged": m(input_ids=ids).logits.tolist(), "peft": p(input_ids=ids).logits.tolist()}
print(json.dumps({**out, "ids": tok("good dull plot")["input_ids"]}))
"""


def test_exports_load_without_supernet(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "good", "bad", "movie", "plot", "fine", "dull"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    net = make_net("bert", scaling="rora")
    cfg = mixed_config(net)
    enc = tokenizer(["good movie", "bad bad movie"], padding=True, return_tensors="pt")
    export_merged(net, cfg, tmp_path / "merged", batches=[enc], tokenizer=tokenizer)
    export_peft(net, cfg, tmp_path / "peft", batches=[enc], tokenizer=tokenizer)
    plain_base(net).save_pretrained(tmp_path / "base")
    ids = torch.randint(0, VOCAB, (2, 7))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER, str(tmp_path / "base"), str(tmp_path / "merged"),
                           str(tmp_path / "peft"), json.dumps(ids.tolist())],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == [2, 7, 5]
    ours = logits_at(net, cfg, {"input_ids": ids})
    for fmt in ("merged", "peft"):
        assert (torch.tensor(got[fmt]) - ours).abs().max() <= 1e-4
    assert Path(tmp_path / "peft" / "adapter_model.safetensors").is_file()
