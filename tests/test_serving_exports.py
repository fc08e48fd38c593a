"""PEFT exports as serving runtimes read them: vLLM's LoRA loader applies one ``lora_alpha / r``
(``/ sqrt(r)`` with rsLoRA) to every module, reads no ``rank_pattern`` / ``alpha_pattern``, takes
each module's rank from its tensors and serves no ``modules_to_save``. The loader below follows
those rules in a fresh interpreter with torch, safetensors and transformers only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_export import batch, logits_at, make_net, mixed_config, plain_base

from supernet.export import export_peft

VLLM_RULES = """
import json, math, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

base, folder, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = json.load(open(folder + "/adapter_config.json"))
missing = {"r", "lora_alpha", "target_modules"} - set(cfg)
if missing or cfg.get("modules_to_save") or cfg.get("use_dora"):
    sys.exit(f"refused as vLLM refuses it: missing {missing}, modules_to_save {cfg.get('modules_to_save')}")
scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
model = AutoModelForCausalLM.from_pretrained(base).eval()
tensors = load_file(folder + "/adapter_model.safetensors")
ranks = {}
with torch.no_grad():
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        assert a.shape[0] == b.shape[1] <= cfg["r"], name  # padded up to --max-lora-rank >= r
        model.get_submodule(name).weight += scale * (b @ a)
        ranks[name] = a.shape[0]
    logits = model(input_ids=torch.tensor(ids)).logits
assert not any(k.startswith(("supernet", "peft")) for k in sys.modules)
print(json.dumps({"ranks": ranks, "logits": logits.tolist()}))
"""


def served(tmp_path, folder, ids) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", VLLM_RULES, str(tmp_path / "base"), str(folder),
                           json.dumps(ids.tolist())], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ranks": out["ranks"], "logits": torch.tensor(out["logits"])}


@pytest.mark.parametrize("scaling", ["lora", "rora"])
def test_folded_peft_export_is_served_by_vllm_rules_as_peft_serves_it(scaling, tmp_path):
    from peft import PeftModel

    net = make_net("llama", scaling=scaling)
    cfg = mixed_config(net)  # ranks 8, 4, 2: alpha / r_m differs per module
    inputs = batch(net)
    folded = export_peft(net, cfg, tmp_path / "folded", batches=[inputs])
    pattern = export_peft(net, cfg, tmp_path / "pattern", batches=[inputs], scale="pattern")
    plain_base(net).save_pretrained(tmp_path / "base")
    ours = logits_at(net, cfg, {"input_ids": inputs["input_ids"]})

    got = served(tmp_path, tmp_path / "folded", inputs["input_ids"])
    assert got["ranks"] == {n: cfg[g] for g, names in net.groups.items() for n in names}
    assert (got["logits"] - ours).abs().max() <= 1e-4
    peft = PeftModel.from_pretrained(plain_base(net), str(tmp_path / "folded")).eval()
    with torch.no_grad():
        assert (peft(**inputs).logits - got["logits"]).abs().max() <= 1e-4
    assert folded["vllm"] == {"scale": "folded", "servable": True, "why_not": [], "max_lora_rank": 8}

    # the trained layout is exact in PEFT but served at the wrong strength by such a loader
    wrong = served(tmp_path, tmp_path / "pattern", inputs["input_ids"])
    assert (wrong["logits"] - ours).abs().max() > 1e-2
    assert not pattern["vllm"]["servable"] and "alpha_pattern" in pattern["vllm"]["why_not"][0]


def test_a_trained_head_is_reported_as_not_servable_by_vllm(tmp_path):
    net = make_net("bert")
    manifest = export_peft(net, mixed_config(net), tmp_path / "p", batches=[batch(net)])
    assert not manifest["vllm"]["servable"] and "modules_to_save" in manifest["vllm"]["why_not"][0]
