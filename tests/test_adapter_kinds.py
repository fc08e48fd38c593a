"""Adapter kinds are pluggable: a kind defined in this file, registered, is trained, searched and
exported (merged and PEFT) through the CLI without any library file knowing it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from torch import nn

from supernet.adapters import ADAPTER_KINDS, ElasticAdapter, LoraFactors, register_adapter_kind
from supernet.errors import SupernetError


class ToyVera(ElasticAdapter):
    """A VeRA-like toy: a frozen random projection ``P`` (rank ``r_max`` x in, fixed by the layer's
    shape, so it is rebuilt identically and never saved) and a trained ``U`` (out x r_max); rank
    ``r`` uses ``U[:, :r] P[:r]``. Folds into LoRA exactly: ``A = P[:r]``, ``B = U[:, :r]``, scale 1."""

    kind = "toy-vera"

    def __init__(self, base: nn.Module, max_rank: int, merge: str = "plain") -> None:
        super().__init__(base, merge)
        g = torch.Generator().manual_seed(self.in_features * 7919 + self.out_features)
        projection = torch.randn(max_rank, self.in_features, generator=g) / self.in_features ** 0.5
        self.register_buffer("projection", projection, persistent=False)
        self.u = nn.Parameter(torch.randn(self.out_features, max_rank, generator=g) * 0.3)  # non-zero: tests can fail
        self.max_rank = max_rank
        self.active = self.largest()

    @classmethod
    def dimensions(cls, options) -> dict[str, list]:
        return {"rank": list(options.ranks)}

    @classmethod
    def build(cls, base, options):
        return cls(base, options.max_rank, options.merge)

    def largest(self):
        return {"rank": self.max_rank}

    def activate(self, choices):
        rank = choices["rank"]
        if not 1 <= rank <= self.max_rank:
            raise SupernetError(f"rank {rank} is outside 1..{self.max_rank}")
        self.active = {"rank": rank}

    def delta_weight(self):
        r = self.active["rank"]
        return self.u[:, :r] @ self.projection[:r]

    def forward(self, x):
        if self._merged is not None or self.through_base:
            return self.folded_forward(x)
        return self.base_forward(x) + (x.to(self.u.dtype) @ self.delta_weight().T).to(x.dtype)

    def adapter_params(self, choice=None):
        return int(self.choices(choice)["rank"]) * self.out_features

    def adapter_macs_per_token(self, choice=None):
        r = int(self.choices(choice)["rank"])
        return r * (self.in_features + self.out_features)

    def lora_factors(self):
        r = self.active["rank"]
        return LoraFactors(self.projection[:r].detach(), self.u[:, :r].detach(), float(r), False, 1.0)


@pytest.fixture
def toy_kind():
    register_adapter_kind(ToyVera)
    yield ToyVera
    ADAPTER_KINDS.pop(ToyVera.kind, None)


def test_a_kind_defined_outside_the_library_trains_searches_and_exports(capsys, toy_kind, tiny_train_args, tmp_path):
    code, out, err = cli(capsys, "train", *tiny_train_args, "--adapter", "toy-vera", "--name", "toy")
    assert code == 0, err
    run = tmp_path / "runs" / "toy"
    record = json.loads((run / "config.json").read_text())
    assert record["supernet"]["adapter"] == "toy-vera"
    # the kind's own cost: r * out per module, not LoRA's r * (in + out)
    assert record["trainable_params"]["max"] - record["trainable_params"]["min"] == sum(
        (8 - 4) * shape for shape in _out_features(run, record))
    code, out, err = cli(capsys, "search", "--run", run, "--objectives", "acc,params", "--population", "2",
                         "--evaluations", "4", "--eval-samples", "16", "--name", "s")
    assert code == 0, err
    for fmt in ("merged", "peft"):
        code, out, err = cli(capsys, "export", "--run", run, "--subnet", "best", "--search", "s", "--format", fmt,
                             "--out", tmp_path / fmt)
        assert code == 0, err
        manifest = json.loads((tmp_path / fmt / "manifest.json").read_text())
        assert manifest["verification"]["max_abs_diff"] <= manifest["verification"]["tolerance"]
    peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(peft["rank_pattern"].values()) <= {8, 6, 4}


def _out_features(run, record):
    from supernet.loader import load_run

    setup, _ = load_run(run, weights=False)
    return [a.out_features for a in setup.net.adapters.values()]


def test_an_unknown_kind_is_refused_in_one_line(capsys, tiny_train_args, tmp_path):
    code, _, err = cli(capsys, "train", *tiny_train_args, "--adapter", "nope", "--name", "x")
    assert code == 2 and "unknown adapter kind 'nope'" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "x").exists()
