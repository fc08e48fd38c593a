"""SuperNetwork: injection by pattern, groups, configs, costs, and PEFT equivalence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from supernet.errors import SupernetError
from supernet.network import SuperNetConfig, SuperNetwork, default_targets
from supernet.space import SearchSpace


def bert_net(ranks=(8, 6, 4), attn="sdpa", **kw):
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3, attn_implementation=attn)).eval()
    cfg = SuperNetConfig(target_modules=["query", "key", "value", "dense"], ranks=list(ranks),
                         trainable_modules=["classifier"], **kw)
    return SuperNetwork(model, cfg)


def randomise(net):
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.5)


def test_bert_targets_and_block_groups():
    net = bert_net()
    # 2 layers x (q, k, v, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert len(net.adapters) == 13
    assert net.groups["L0.qkv"] == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value",
    ]
    assert set(net.groups) == {
        "L0.qkv", "L0.attention.output.dense", "L0.intermediate.dense", "L0.output.dense",
        "L1.qkv", "L1.attention.output.dense", "L1.intermediate.dense", "L1.output.dense",
        "bert.pooler.dense",
    }
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("classifier") for n in trainable)


def test_llama_default_targets_groups_qkv_and_gate_up():
    model = LlamaForCausalLM(tiny_llama_config())
    targets = default_targets(model)
    net = SuperNetwork(model, SuperNetConfig(target_modules=targets, ranks=[8, 4]))
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
    assert set(net.adapters) == {f"model.layers.{i}.{p}" for i in (0, 1) for p in projections}
    assert set(net.groups) == {f"L{i}.{g}" for i in (0, 1) for g in ("qkv", "self_attn.o_proj", "up", "mlp.down_proj")}
    assert net.groups["L0.up"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert "lm_head" not in net.adapters


def test_gpt2_conv1d_targets():
    """GPT-2's Conv1D layers (weight stored ``(in, out)``; attn.c_proj is square) get adapters whose
    output equals a GPT-2 with ``s * (B A)^T`` added to each Conv1D weight, computed by hand."""
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    reference = GPT2LMHeadModel(config).eval()
    reference.load_state_dict(model.state_dict())
    net = SuperNetwork(model, SuperNetConfig(target_modules=default_targets(model), ranks=[4, 2], alpha=8.0))
    assert len(net.adapters) == 8
    assert set(net.groups) == {f"L{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")}
    randomise(net)
    cfg = {g: 4 if i % 2 else 2 for i, g in enumerate(net.groups)}
    net.activate(cfg)
    with torch.no_grad():
        for name, ad in net.adapters.items():
            r = cfg[next(g for g, names in net.groups.items() if name in names)]
            conv = reference.get_submodule(name)
            conv.weight += (ad.lora_B[:, :r] @ ad.lora_A[:r]).t() * (8.0 / r)  # Conv1D weight is (in, out)
        ids = torch.randint(0, 100, (2, 8))
        ours = net.model(input_ids=ids).logits
        torch.testing.assert_close(ours, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        net.reset()
        assert not torch.allclose(net.model(input_ids=ids).logits, ours, atol=1e-4)  # the ranks matter


def test_activate_reset_roundtrip():
    net = bert_net()
    cfg = net.sample(np.random.default_rng(3))
    assert net.activate(cfg) == cfg
    assert net.active_config() == cfg
    for group, names in net.groups.items():
        assert all(net.adapters[n].active_rank == cfg[group] for n in names)
    net.reset()
    assert net.active_config() == net.max_config()


def test_config_sample_and_serialise_roundtrip():
    net = bert_net()
    a = net.sample(np.random.default_rng(7))
    assert net.space.validate(json.loads(json.dumps(a))) == a
    assert net.sample(np.random.default_rng(7)) == a
    others = [net.sample(np.random.default_rng(s)) for s in range(8)]
    assert any(o != a for o in others)
    space = SearchSpace.from_json(json.loads(json.dumps(net.space.to_json())))
    assert space.choices == net.space.choices


def test_sampler_draws_every_choice_uniformly():
    """Each group's choice is uniform over all its choices, the largest and smallest included."""
    space = SearchSpace({"a": [8, 6, 4], "b": [16, 12, 8, 4]})
    rng = np.random.default_rng(0)
    draws = [space.sample(rng) for _ in range(3000)]
    for group, choices in space.choices.items():
        counts = {c: sum(d[group] == c for d in draws) for c in choices}
        expected = len(draws) / len(choices)
        for n in counts.values():  # binomial sd is at most 26 here; 5 sd of slack
            assert abs(n - expected) < 130, (group, counts)
    assert SearchSpace({"only": [5]}).sample(rng) == {"only": 5}
    net = bert_net(ranks=(8, 6, 4))
    seen = [net.sample(np.random.default_rng(s)) for s in range(200)]
    for group in net.groups:
        assert {cfg[group] for cfg in seen} == {8, 6, 4}, group


def test_max_min_mid():
    net = bert_net(ranks=(16, 4, 8, 12))
    assert set(net.max_config().values()) == {16}
    assert set(net.min_config().values()) == {4}
    assert set(net.mid_config().values()) == {12}  # choices (16, 12, 8, 4): index (4 - 1) // 2 = 1


def test_invalid_configs_raise():
    net = bert_net()
    good = net.max_config()
    with pytest.raises(SupernetError, match="not one of"):
        net.activate({**good, "L0.qkv": 5})
    with pytest.raises(SupernetError, match="lacks"):
        net.activate({k: v for k, v in good.items() if k != "L0.qkv"})
    with pytest.raises(SupernetError, match="does not have"):
        net.activate({**good, "nope": 8})
    with pytest.raises(SupernetError, match="must be a JSON object"):
        net.activate([8, 8])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["nothing_here"]}, "match no linear module"),
        ({"ranks": [33]}, "exceeds the size"),
        ({"ranks": []}, "empty"),
        ({"ranks": [0, 4]}, "positive"),
        ({"groups": {"g": ["no_such_module"]}}, "names no target module"),
        ({"groups": {"g": ["query"]}}, "in no group"),
        ({"groups": "per-head"}, "unknown grouping"),
    ],
)
def test_bad_supernet_configs(kwargs, message):
    model = BertForSequenceClassification(tiny_bert_config())
    base = {"target_modules": ["query", "key", "value", "dense"], "ranks": [8, 4]}
    base.update(kwargs)
    with pytest.raises(SupernetError, match=message):
        SuperNetwork(model, SuperNetConfig(**base))


def test_targets_inside_the_trained_head_are_left_alone():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64))
    net = SuperNetwork(model, SuperNetConfig(target_modules=["query", "dense"], ranks=[4],
                                             trainable_modules=["classifier"]))
    assert not any(n.startswith("classifier") for n in net.adapters)
    assert net.head_params() == sum(p.numel() for p in model.classifier.parameters())


def test_custom_groups():
    model = BertForSequenceClassification(tiny_bert_config())
    groups = {"attn": ["re:.*attention.*"], "ffn": ["intermediate.dense", "re:.*layer\\.\\d+\\.output\\.dense"],
              "pool": ["pooler.dense"]}
    net = SuperNetwork(model, SuperNetConfig(target_modules=["query", "key", "value", "dense"], ranks=[8, 4],
                                             groups=groups))
    assert list(net.groups) == ["attn", "ffn", "pool"]
    assert len(net.groups["attn"]) == 8 and len(net.groups["ffn"]) == 4


@pytest.mark.parametrize(("scaling", "use_rslora"), [("lora", False), ("rora", True), ("fixed", False)])
def test_equals_peft_lora_at_fixed_rank(scaling, use_rslora):
    """Our super-network at rank r == PEFT LoRA of rank r holding the same weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = bert_net(ranks=(8, 4), alpha=12.0, scaling=scaling)
    randomise(net)
    net.activate(net.min_config())  # rank 4 everywhere
    peft_base = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    state = {k.replace(".base.layer.", "."): v for k, v in net.model.state_dict().items() if "lora_" not in k}
    peft_base.load_state_dict(state)
    # fixed scaling is alpha/r_max whatever the rank: PEFT expresses it as alpha' = alpha * r / r_max
    alpha = 12.0 * 4 / 8 if scaling == "fixed" else 12.0
    peft_model = get_peft_model(peft_base, LoraConfig(r=4, lora_alpha=alpha, use_rslora=use_rslora,
                                                      target_modules=["query", "key", "value", "dense"],
                                                      modules_to_save=["classifier"])).eval()
    with torch.no_grad():
        for name, ad in net.adapters.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(ad.lora_A[:4])
            layer.lora_B["default"].weight.copy_(ad.lora_B[:, :4])
        peft_model.base_model.model.classifier.modules_to_save["default"].load_state_dict(
            net.model.classifier.state_dict())
    ids = torch.randint(0, 30522, (3, 10))
    ours = net.model(input_ids=ids).logits
    theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, net_max_logits(net, ids), atol=1e-4)  # rank really matters


def net_max_logits(net, ids):
    net.reset()
    with torch.no_grad():
        return net.model(input_ids=ids).logits


def test_macs_match_flop_counter_and_formula():
    """MACs of linear layers, adapters and attention against FlopCounterMode, a hand count, and
    the quadratic-in-T attention term on its own."""
    from torch.utils.flop_counter import FlopCounterMode

    # eager attention runs its two matmuls (Q K^T and P V) as bmm, which FlopCounterMode counts
    net = bert_net(attn="eager")
    randomise(net)
    seq, d, layers = 12, 32, 2
    for cfg in (net.max_config(), net.min_config(), net.sample(np.random.default_rng(1))):
        net.activate(cfg)
        with FlopCounterMode(display=False) as fc:
            net.model(input_ids=torch.ones(1, seq, dtype=torch.long))
        counts = fc.get_flop_counts()["Global"]
        assert counts[torch.ops.aten.bmm] // 2 == layers * 2 * seq * seq * d  # T x T scores, then T x d mix
        assert net.macs(cfg, seq) == fc.get_total_flops() // 2
    # by hand at the min config (rank 4): blocks see 12 tokens, pooler and classifier one
    block = 4 * 32 * 32 + 2 * 32 * 64
    adapters = 4 * (4 * 64 + 2 * 96)  # q, k, v, attn-out: r(in+out)=4*64; intermediate/output: 4*96
    per_head = 2 * seq * seq * (32 // 4)  # scores and weighted sum of one head
    expected = 2 * (seq * (block + adapters) + 4 * per_head) + (32 * 32 + 4 * 64) + 32 * 3
    assert net.macs(net.min_config(), seq) == expected
    # macs(T) = a T^2 + b T + c: the second difference over T isolates a = 2 d per layer
    m = [net.macs(net.min_config(), t) for t in (10, 11, 12)]
    assert m[2] - 2 * m[1] + m[0] == 2 * (layers * 2 * d)


def test_trainable_params_formula():
    net = bert_net()
    head = 32 * 3 + 3
    per_layer = 4 * 4 * 64 + 2 * 4 * 96
    assert net.trainable_params(net.min_config()) == head + 2 * per_layer + 4 * 64
    assert net.trainable_params(net.max_config()) == head + 2 * 2 * per_layer + 8 * 64
