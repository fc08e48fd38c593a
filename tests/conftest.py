from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from supernet.cli import _quiet_libraries
from supernet.models import BUILTIN_MODELS, package_dir

_quiet_libraries()

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "brilliant", "moving"]
NEGATIVE = ["bad", "awful", "dull", "boring", "poor", "weak", "tedious", "messy"]


def cli(capsys, *argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from supernet.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, message):
    """Exactly one line ``supernet: error: ...`` containing ``message``, exit code 2."""
    assert code == 2, err
    assert err.startswith("supernet: error:") and err.count("\n") == 1 and message in err, err


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def tiny_bert_config(**kw):
    from transformers import BertConfig

    base = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                pad_token_id=0, architectures=["LlamaForCausalLM"])
    base.update(kw)
    return LlamaConfig(**base)


def _tokenizer_files(dst: Path) -> None:
    src = package_dir(BUILTIN_MODELS["minilm"][0], BUILTIN_MODELS["minilm"][3]) / "model"
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, dst / f)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT on disk with MiniLM's tokenizer (loads in milliseconds)."""
    from transformers import BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = tiny_bert_config(architectures=["BertModel"])
    BertModel(cfg).save_pretrained(d)
    _tokenizer_files(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(d)
    _tokenizer_files(d)
    return d


@pytest.fixture(scope="session")
def confident_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama with ``initializer_range=0.1``: tests that train it need an output layer
    that can express a confident answer. The LM head stays frozen, and at the default 0.02 the
    logits of two answers can differ by about one nat at most, so the answer loss can fall
    only about half-way whatever the adapters learn."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("confident-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(initializer_range=0.1)).save_pretrained(d)
    _tokenizer_files(d)
    return d


@pytest.fixture(scope="session")
def signal_csv(tmp_path_factory) -> Path:
    """Two classes that any tiny model learns decisively: three of the five words of every text
    are one class word ("good" or "bad"), the rest neutral filler. Same columns and labels as
    ``tiny_csv``. Tests that assert training progress use it, so that the outcome does not hang
    on a CPU's kernels."""
    p = tmp_path_factory.mktemp("signal") / "signal.csv"
    write_signal_csv(p)
    return p


def write_signal_csv(path: Path) -> None:
    """The rows of ``signal_csv`` (also the data of tests/fixtures/make_old_run.py)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        pos = i % 2 == 0
        words = ["good" if pos else "bad"] * 3 + list(rng.choice(["movie", "plot", "cast"], 2))
        rng.shuffle(words)
        rows.append((" ".join(words), "yes" if pos else "no"))
    pd.DataFrame(rows, columns=["sentence", "sentiment"]).to_csv(path, index=False)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    """A learnable two-class sentiment CSV with string labels."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        pos = i % 2 == 0
        words = list(rng.choice(POSITIVE if pos else NEGATIVE, 3)) + list(rng.choice(["movie", "plot", "cast"], 2))
        rng.shuffle(words)
        rows.append((" ".join(words), "yes" if pos else "no"))
    import pandas as pd

    p = tmp_path_factory.mktemp("data") / "tiny.csv"
    pd.DataFrame(rows, columns=["sentence", "sentiment"]).to_csv(p, index=False)
    return p


@pytest.fixture
def tiny_train_args(tiny_bert_dir, tiny_csv, tmp_path):
    """CLI flags of a short run on the tiny model and data."""
    return ["--model", str(tiny_bert_dir), "--dataset", str(tiny_csv), "--text-column", "sentence",
            "--label-column", "sentiment", "--ranks", "8,6,4", "--max-steps", "6", "--batch-size", "8",
            "--eval-every", "3", "--save-every", "3", "--eval-samples", "16", "--max-length", "16",
            "--out", str(tmp_path / "runs")]
