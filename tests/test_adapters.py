"""ElasticLoRA: slicing, gradients, scaling, and equivalence with PEFT's LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from supernet.adapters import ElasticLoRA, lora_scale
from supernet.errors import SupernetError


def _adapter(scaling="lora", r_max=8, alpha=16.0):
    base = nn.Linear(12, 10)
    ad = ElasticLoRA(base, r_max, alpha=alpha, scaling=scaling)
    with torch.no_grad():
        ad.lora_B.normal_()  # B starts at zero: randomise so the tests can fail
    return ad


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_slice_equals_plain_linears(rank):
    ad = _adapter()
    ad.set_active(rank)
    a = nn.Linear(12, rank, bias=False)
    b = nn.Linear(rank, 10, bias=False)
    with torch.no_grad():
        a.weight.copy_(ad.lora_A[:rank])
        b.weight.copy_(ad.lora_B[:, :rank])
    x = torch.randn(4, 5, 12)
    expected = ad.base(x) + b(a(x)) * (16.0 / rank)
    torch.testing.assert_close(ad(x), expected)
    # the single delta_weight agrees with the forward
    torch.testing.assert_close(ad(x), nn.functional.linear(x, ad.base.weight + ad.delta_weight(), ad.base.bias))


def test_gradients_reach_only_active_slice():
    ad = _adapter()
    ad.set_active(3)
    ad(torch.randn(6, 12)).pow(2).sum().backward()
    assert ad.lora_A.grad[:3].abs().sum() > 0 and ad.lora_B.grad[:, :3].abs().sum() > 0
    assert torch.all(ad.lora_A.grad[3:] == 0)
    assert torch.all(ad.lora_B.grad[:, 3:] == 0)
    assert ad.base.weight.grad is None and not ad.base.weight.requires_grad


def test_active_rank_holds_in_eval_and_train():
    """SQFT's layer silently evaluated at full rank; ours keeps the chosen rank in eval too."""
    ad = _adapter()
    x = torch.randn(3, 12)
    full = ad(x)
    ad.set_active(2)
    at_two = ad.base(x) + x @ ad.lora_A[:2].t() @ ad.lora_B[:, :2].t() * (16.0 / 2)
    for mode in (ad.eval, ad.train, ad.eval):
        mode()
        assert ad.active_rank == 2
        torch.testing.assert_close(ad(x), at_two)
    assert not torch.allclose(ad(x), full)
    ad.reset()
    assert ad.active_rank == 8
    torch.testing.assert_close(ad(x), full)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("fixed", 16 / 8), ("lora", 16 / 4), ("rora", 16 / math.sqrt(4))],
)
def test_scaling_modes(mode, expected):
    assert lora_scale(mode, 16.0, 4, 8) == pytest.approx(expected)
    ad = _adapter(mode)
    ad.set_active(4)
    assert ad.scaling == pytest.approx(expected)


def test_bad_ranks_raise():
    with pytest.raises(SupernetError):
        ElasticLoRA(nn.Linear(4, 4), 0)
    with pytest.raises(SupernetError):
        ElasticLoRA(nn.Linear(4, 4), 5)  # above min(in, out)
    ad = _adapter()
    with pytest.raises(SupernetError):
        ad.set_active(9)
    with pytest.raises(SupernetError):
        lora_scale("cubic", 1.0, 1, 1)


def test_conv1d_is_wrapped_like_linear():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 12)  # nf=out, nx=in; weight (in, out)
    ad = ElasticLoRA(conv, 4)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad.set_active(2)
    x = torch.randn(3, 12)
    expected = x @ (conv.weight.t() + ad.delta_weight()).t() + conv.bias
    torch.testing.assert_close(ad(x), expected)
    assert ad.base_weight().shape == (10, 12)
