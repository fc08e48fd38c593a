"""Batched scoring (length-sorted, padded, prepared once) equals scoring one example at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertForSequenceClassification, LlamaForCausalLM

from supernet.data import TaskData
from supernet.tasks import _answers, encode, prepare, score


def _data(n=24, choices=False, answers=None):
    rng = np.random.default_rng(0)
    words = ["good", "bad", "plot", "cast", "movie", "long", "short", "film", "the", "a"]
    rows = {"text": [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n)],
            "label": [int(i % 3 if choices else i % 2) for i in range(n)]}
    if choices:
        rows["choices"] = [["yes", "no way at all", "maybe so"] if i % 2 else ["yes", "no way at all"]
                           for i in range(n)]
        rows["label"] = [i % len(c) for i, c in enumerate(rows["choices"])]
    ds = Dataset.from_dict(rows)
    return TaskData(DatasetDict({"train": ds, "validation": ds, "test": ds}), ["0", "1", "2"] if choices else
                    ["neg", "pos"], prompt="Review: {text}\nVerdict:", answers=answers or {"neg": "bad", "pos": "good"},
                    has_choices=choices)


def _one_by_one_lm(model, enc, split):
    """Reference: every prompt + answer alone, unpadded, full log-softmax."""
    ds = enc.splits[split]
    out = torch.full((len(ds), enc.num_classes), float("-inf"))
    for i in range(len(ds)):
        row = ds[i]
        for k, answer in enumerate(_answers(enc, row)):
            ids = torch.tensor([list(row["prompt_ids"]) + answer])
            logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = len(row["prompt_ids"])
            out[i, k] = sum(logp[start - 1 + j, t] for j, t in enumerate(answer))
    return out


LONG_ANSWERS = {"neg": "not good at all", "pos": "really very great"}


@pytest.mark.parametrize(("choices", "answers"), [(False, None), (False, LONG_ANSWERS), (True, None)])
def test_causal_lm_scores_match_one_by_one(tiny_llama_dir, choices, answers):
    """Shared one-token answers (prompt only), shared multi-token answers (prompt once, answers
    through the cropped KV cache) and per-example answers (prompt + answer sequences)."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    enc = encode(_data(choices=choices, answers=answers), tok, "causal-lm", 24)
    if answers:  # two multi-token answers: the second one runs on the cache cropped after the first
        assert all(len(a) > 1 for a in enc.answer_ids)
    with torch.no_grad():
        ref = _one_by_one_lm(model, enc, "validation")
        got = score(model, enc, prepare(enc, "validation", batch_size=5))
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], ref[finite], atol=1e-4, rtol=1e-4)
    assert ref[finite].std() > 1e-3  # the scores differ between examples: order matters


def test_seq_cls_scores_match_one_by_one_and_indices_keep_their_order(tiny_bert_dir):
    from conftest import tiny_bert_config

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    enc = encode(_data(), tok, "seq-cls", 16)
    ds = enc.splits["validation"]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=torch.tensor([ds[i]["input_ids"]])).logits for i in range(len(ds))])
        got = score(model, enc, prepare(enc, "validation", batch_size=4))
        picked = [7, 2, 19, 0]
        sub = prepare(enc, "validation", batch_size=3, indices=picked)
        got_sub = score(model, enc, sub)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sub, ref[picked], atol=1e-5, rtol=1e-5)
    assert sub.labels.tolist() == [ds[i]["labels"] for i in picked]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merged_inference_equals_the_adapter_path(arch):
    """``net.merged()`` folds each active sub-adapter into a dense weight (Conv1D included):
    same outputs as the unmerged forward, and everything is as before afterwards."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from supernet.network import SuperNetConfig, SuperNetwork, default_targets

    torch.manual_seed(0)
    if arch == "bert":
        from conftest import tiny_bert_config

        model = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)).eval()
    net = SuperNetwork(model, SuperNetConfig(target_modules=default_targets(model), ranks=[8, 4], alpha=8.0))
    with torch.no_grad():
        for ad in net.adapters.values():
            ad.lora_B.normal_(std=0.5)
    config = net.sample(np.random.default_rng(1))
    net.activate(config)
    ids = torch.randint(1, 100, (3, 10))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with net.merged():
            merged = model(input_ids=ids).logits
            assert all(ad._merged is not None for ad in net.adapters.values())
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, plain) and all(ad._merged is None for ad in net.adapters.values())
    net.reset()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)  # the config mattered


def test_answers_that_tokenize_alike_are_refused(tiny_llama_dir):
    """Shared answers and the choices of one example must tokenize differently (else every
    prediction is a tie); an answer that tokenizes to nothing cannot be scored at all."""
    from supernet.errors import SupernetError

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok(" ☃", add_special_tokens=False)["input_ids"] == tok(" ☄", add_special_tokens=False)["input_ids"]
    with pytest.raises(SupernetError, match="answers '☃' and '☄' both tokenize to"):
        encode(_data(answers={"neg": "☃", "pos": "☄"}), tok, "causal-lm", 24)
    with pytest.raises(SupernetError, match="tokenizes to no tokens"):
        encode(_data(answers={"neg": "\u200b", "pos": "good"}), tok, "causal-lm", 24)
    data = _data(choices=True)
    rows = data.splits["train"].to_dict()
    rows["choices"][7] = ["yes", "☃", "☄"]
    data.splits["train"] = Dataset.from_dict(rows, features=data.splits["train"].features)
    with pytest.raises(SupernetError, match=r"example 7 of the train split \(.*\): choices '☃' and '☄' both tokenize"):
        encode(data, tok, "causal-lm", 24)
    encode(_data(choices=True), tok, "causal-lm", 24)  # distinct choices pass
