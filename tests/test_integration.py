"""Integration on the real assets: MiniLM-L6 on Rotten Tomatoes, and SmolLM2's causal-LM path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supernet.commands.eval import eval_run
from supernet.network import SuperNetConfig, SuperNetwork, default_targets
from supernet.tasks import evaluate
from supernet.train import TrainConfig, build, train

pytestmark = pytest.mark.integration


def test_minilm_supernet_structure_macs_and_peft_equivalence():
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from supernet.models import load_model

    model, _ = load_model("minilm", "seq-cls", num_labels=2)
    targets = default_targets(model)
    net = SuperNetwork(model.eval(), SuperNetConfig(target_modules=targets, ranks=[32, 24, 16],
                                                    trainable_modules=["classifier"]))
    # q, k, v, attention output, intermediate, output in each of 6 blocks; the pooler is no block projection
    assert len(net.adapters) == 6 * 6 and len(net.groups) == 6 * 4
    assert not any("pooler" in n for n in net.adapters)
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.02)
    cfg = net.sample(np.random.default_rng(0))
    net.activate(cfg)
    with FlopCounterMode(display=False) as fc:
        net.model(input_ids=torch.ones(1, 64, dtype=torch.long))
    assert net.macs(cfg, 64) == fc.get_total_flops() // 2 + 2 * 64 * 64 * 384 * 6

    # rank 16 everywhere == PEFT LoRA r=16 with the same weights, on the real model
    net.activate(net.min_config())
    ref, _ = load_model("minilm", "seq-cls", num_labels=2)
    ref.classifier.load_state_dict(net.model.classifier.state_dict())
    peft_model = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, target_modules=list(net.adapters))).eval()
    with torch.no_grad():
        for name, ad in net.adapters.items():
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(ad.lora_A[:16])
            layer.lora_B["default"].weight.copy_(ad.lora_B[:, :16])
    ids = torch.randint(1000, 20000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(net.model(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_minilm_rotten_tomatoes_short_nls_run(tmp_path):
    """A short NLS run on the real data: both extreme sub-networks learn the task decisively
    (the majority class is 58 %; measured here: loss 0.693 -> 0.537 / 0.511 and accuracy 76.7 / 80.0 %
    for max / min, so the thresholds below leave 8+ points and half the drop as margin)."""
    cfg = TrainConfig(max_steps=100, lr=1e-3, train_samples=1600, eval_samples=300, eval_every=100, save_every=100,
                      out=str(tmp_path), name="rt")
    s = build(cfg)
    before = {}
    for sub in ("max", "min"):
        s.net.activate(s.net.space.named_config(sub))
        before[sub] = evaluate(s.net.model, s.enc, "validation", limit=300)["loss"]
    train(cfg)
    for sub in ("max", "min"):
        after = eval_run(cfg.run_dir(), sub, "validation", limit=300)
        assert after["accuracy"] >= 0.68, (sub, after)
        assert after["loss"] < before[sub] - 0.08, (sub, before[sub], after["loss"])


def test_smollm2_causal_lm_path(tmp_path):
    """SmolLM2-135M from its GGUF (cached as safetensors once): zero-shot scoring, then NLS steps."""
    cfg = TrainConfig(model="smollm2", ranks=[8, 4], max_steps=2, batch_size=2, train_samples=8,
                      eval_samples=8, eval_every=2, save_every=2, out=str(tmp_path), name="lm")
    s = build(cfg)
    assert s.task == "causal-lm"
    assert set(s.net.groups) >= {"L0.qkv", "L0.up", "L0.self_attn.o_proj", "L0.mlp.down_proj"}
    zero_shot = evaluate(s.net.model, s.enc, "validation", limit=64, batch_size=16)
    assert zero_shot["accuracy"] > 0.6  # about 74.5% zero-shot when the assets were surveyed; chance is 50%
    summary = train(cfg)
    assert summary["steps"] == 2
    res = eval_run(cfg.run_dir(), "min", "test", limit=8)
    assert res["examples"] == 8 and res["macs"] > 0
