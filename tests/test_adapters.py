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
    # the single delta_weight agrees with the forward (merged: another summation order, so rtol 1e-5)
    merged = nn.functional.linear(x, ad.base_weight() + ad.delta_weight(), ad.base.bias)
    torch.testing.assert_close(ad(x), merged, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_active_slice():
    ad = _adapter()
    ad.set_active(3)
    ad(torch.randn(6, 12)).pow(2).sum().backward()
    assert ad.lora_A.grad[:3].abs().sum() > 0 and ad.lora_B.grad[:, :3].abs().sum() > 0
    assert torch.all(ad.lora_A.grad[3:] == 0)
    assert torch.all(ad.lora_B.grad[:, 3:] == 0)
    assert ad.base.layer.weight.grad is None and not ad.base.layer.weight.requires_grad


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
    with pytest.raises(SupernetError, match="rank must be positive"):
        ElasticLoRA(nn.Linear(4, 4), 0)
    with pytest.raises(SupernetError, match="exceeds the layer size"):
        ElasticLoRA(nn.Linear(4, 4), 5)  # above min(in, out)
    ad = _adapter()
    with pytest.raises(SupernetError, match=r"outside 1\.\.8"):
        ad.set_active(9)
    with pytest.raises(SupernetError, match="outside"):
        ad.set_active(0)
    with pytest.raises(SupernetError, match="unknown scaling 'cubic'"):
        lora_scale("cubic", 1.0, 1, 1)


def test_dropout_masks_the_adapter_input_only_and_only_in_training():
    """Dropout acts on the adapter's input (as in PEFT), never on the frozen base path."""
    base = nn.Linear(12, 10)
    ad = ElasticLoRA(base, 4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad.set_active(3)
    a, b = ad.lora_A[:3].detach(), ad.lora_B[:, :3].detach()
    x = torch.randn(64, 12)
    ad.train()
    torch.manual_seed(1)
    out = ad(x)
    torch.manual_seed(1)
    kept = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)  # the same mask, scaled by 1/(1-p)
    assert (kept == 0).any() and (kept != 0).any()
    torch.testing.assert_close(out, base(x) + (x * kept) @ a.t() @ b.t() * (8.0 / 3))
    assert not torch.allclose(out, base(x) + x @ a.t() @ b.t() * (8.0 / 3))
    ad.eval()
    torch.testing.assert_close(ad(x), base(x) + x @ a.t() @ b.t() * (8.0 / 3))


def test_conv1d_is_wrapped_like_linear():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 12)  # nf=out, nx=in; weight (in, out)
    ad = ElasticLoRA(conv, 4)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad.set_active(2)
    x = torch.randn(3, 12)
    expected = x @ (conv.weight.t() + ad.delta_weight()).t() + conv.bias
    torch.testing.assert_close(ad(x), expected, atol=1e-5, rtol=1e-5)
    assert ad.base_weight().shape == (10, 12)


def test_square_conv1d_merge_orientation():
    """Conv1D stores ``(in, out)`` and ``delta_weight()`` is ``(out, in)``: with in == out a
    transposed delta would pass every shape check, so compare values with a non-symmetric delta."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 12)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    ad = ElasticLoRA(conv, 4, alpha=8.0)
    with torch.no_grad():
        ad.lora_B.normal_()
    ad.set_active(3)
    delta = ad.delta_weight().detach()
    assert delta.shape == (12, 12) and (delta - delta.t()).abs().max() > 1.0  # a transpose would show
    torch.testing.assert_close(ad.base_weight(), conv.weight.t())
    x = torch.randn(5, 12)
    out = ad(x)
    torch.testing.assert_close(out, x @ (ad.base_weight() + delta).t() + conv.bias, atol=1e-5, rtol=1e-5)
    # independently of delta_weight: the adapter adds s * x A^T B^T to the Conv1D's x W + b
    manual = x @ conv.weight + conv.bias + x @ ad.lora_A[:3].t() @ ad.lora_B[:, :3].t() * (8.0 / 3)
    torch.testing.assert_close(out, manual)
    # a merge into the Conv1D itself adds delta^T to its (in, out) weight; adding delta is wrong
    merged = Conv1D(12, 12)
    with torch.no_grad():
        merged.weight.copy_(conv.weight + delta.t())
        merged.bias.copy_(conv.bias)
    torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x @ (conv.weight + delta) + conv.bias, out, atol=1e-3)
