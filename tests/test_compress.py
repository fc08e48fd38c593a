"""Compressed frozen bases: Wanda / N:M masks, group-wise quantisation, SparsePEFT and
QA-SparsePEFT, each checked on hand-placed matrices or against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supernet.adapters import ElasticLoRA
from supernet.bases import FrozenBase, MaskedBase, QuantizedBase, frozen_base
from supernet.compress.calibration import input_sq_norms
from supernet.compress.quant import dequantize, fake_quantize, pack_int4, quant_params, quantize, unpack_int4
from supernet.compress.sparsity import magnitude_scores, nm_mask, unstructured_mask, wanda_scores
from supernet.errors import SupernetError

# ------------------------------------------------------------------------------------------ masks
W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                  [4.0, 3.0, -2.0, 1.0]])
NORMS = torch.tensor([16.0, 1.0, 1.0, 1.0])  # ||X_j||^2: feature 0 is four times as loud


def test_wanda_mask_by_hand():
    scores = wanda_scores(W, NORMS)  # |W| * ||X_j||: row 0 [4, 2, 3, 4], row 1 [16, 3, 2, 1]
    torch.testing.assert_close(scores, torch.tensor([[4.0, 2.0, 3.0, 4.0], [16.0, 3.0, 2.0, 1.0]]))
    keep = unstructured_mask(scores, 0.5)
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False]]


def test_magnitude_mask_differs_from_wanda():
    keep = unstructured_mask(magnitude_scores(W), 0.5)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_unstructured_sparsity_is_exact_per_row(ratio):
    scores = torch.rand(7, 40)
    keep = unstructured_mask(scores, ratio)
    dropped = int(ratio * 40)
    assert (keep.sum(1) == 40 - dropped).all()
    # every dropped score is at most every kept score of its row
    for row, k in zip(scores, keep, strict=True):
        assert row[~k].max() <= row[k].min()


def test_nm_mask_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    keep = nm_mask(torch.rand(6, 32), 4, 8)
    assert (keep.reshape(6, 4, 8).sum(-1) == 4).all()


def test_nm_and_ratio_refusals():
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unstructured_mask(torch.rand(2, 8), 1.0)


# ------------------------------------------------------------------------------------ quantisation
@pytest.mark.parametrize("bits", [4, 8])
def test_quantise_error_within_half_a_step(bits):
    w = torch.randn(6, 64)
    w[0, :5] = 0.0
    scale, zero = quant_params(w, bits, 16)
    q = quantize(w, scale, zero, bits, 16)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
    assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= 2**bits - 1).all()
    back = dequantize(q, scale, zero, 16)
    step = scale.repeat_interleave(16, dim=1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (back[0, :5] == 0).all()  # a pruned weight stays exactly zero


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | int(q[0, 1]) << 4  # even column in the low nibble


def test_fake_quantize_is_exact_forward_and_straight_through_backward():
    w0 = torch.randn(4, 32)
    scale, zero = quant_params(w0, 4, 16)
    w = (w0 * 1.0).requires_grad_()
    shifted = w + torch.cat([torch.zeros(4, 16), torch.full((4, 16), 100.0)], dim=1)  # the right half is clipped
    out = fake_quantize(shifted, scale, zero, 4, 16)
    assert torch.equal(out.detach(), dequantize(quantize(shifted, scale, zero, 4, 16), scale, zero, 16))
    out.sum().backward()
    assert (w.grad[:, :16] == 1).all() and (w.grad[:, 16:] == 0).all()


# ------------------------------------------------------------------------------------ bases x merges
def _layer(seed=0, out=8, inp=32):
    torch.manual_seed(seed)
    return nn.Linear(inp, out)


def _base(kind: str, layer: nn.Linear) -> FrozenBase:
    keep = unstructured_mask(torch.rand(layer.weight.shape), 0.5)
    if kind == "dense":
        return FrozenBase(layer)
    if kind == "masked":
        return MaskedBase(layer, keep)
    return QuantizedBase(layer, 4, 16, keep)


COMBOS = [("dense", "plain"), ("dense", "sparse"), ("masked", "plain"), ("masked", "sparse"),
          ("quantized", "plain"), ("quantized", "qa-sparse")]


def _adapter(kind, merge, rank=4):
    ad = ElasticLoRA(_base(kind, _layer()), 6, alpha=12.0, merge=merge)
    with torch.no_grad():
        ad.lora_B.normal_(std=0.5)  # zero at init: randomise so that the update matters
    ad.set_active(rank)
    return ad


@pytest.mark.parametrize(("kind", "merge"), COMBOS)
def test_forward_equals_linear_with_merged_weight(kind, merge):
    ad = _adapter(kind, merge)
    x = torch.randn(3, 5, 32)
    merged = ad.merged_weight().detach()
    torch.testing.assert_close(ad(x), F.linear(x, merged, ad.base.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ad.merge_()
        torch.testing.assert_close(ad(x), F.linear(x, merged, ad.base.bias))
        ad.unmerge_()
    # the update matters, and gradients reach the active factors
    assert (merged - ad.base_weight()).abs().max() > 1e-3
    ad(x).pow(2).sum().backward()
    assert ad.lora_A.grad[:4].abs().sum() > 0 and ad.lora_B.grad[:, :4].abs().sum() > 0
    assert (ad.lora_A.grad[4:] == 0).all()


@pytest.mark.parametrize(("kind", "merge"), COMBOS)
def test_merged_zeros_and_integers(kind, merge):
    ad = _adapter(kind, merge)
    merged = ad.merged_weight().detach()
    mask = ad.base.mask()
    if merge == "plain" or mask is None:
        assert (merged != 0).all()  # a plain merge densifies (no weight is exactly 0 by chance)
    elif kind == "masked":
        assert torch.equal(merged != 0, mask)  # exactly the base's zeros: count and positions
    else:  # every pruned position is exactly 0; a kept weight may also round to the integer z
        assert (merged[~mask] == 0).all() and (merged[mask] != 0).float().mean() > 0.8
    if merge == "qa-sparse":
        q = ad.base.integers(ad.delta_weight().detach())
        assert torch.equal(merged, dequantize(q, ad.base.scale, ad.base.zero, 16))  # on the grid, bit for bit
        assert not torch.equal(q, ad.base.qweight)  # and the adapter moved some integers


def test_qa_sparse_needs_a_quantised_base():
    with pytest.raises(SupernetError, match="quantised base"):
        ElasticLoRA(_base("masked", _layer()), 4, merge="qa-sparse")
    with pytest.raises(SupernetError, match="dropout"):
        ElasticLoRA(_base("masked", _layer()), 4, merge="sparse", dropout=0.1)
    with pytest.raises(SupernetError, match="leave its grid"):  # a masked float update is off the integers
        ElasticLoRA(_base("quantized", _layer()), 4, merge="sparse")
    plain_only = QuantizedBase(_layer(), 4, 16, keep_source=False)
    with pytest.raises(RuntimeError, match="keep_source"):
        plain_only.merge(torch.zeros(8, 32), through=True)


def test_costs_by_hand():
    keep = torch.zeros(8, 32, dtype=torch.bool)
    keep[:, :12] = True  # 96 of 256 kept
    dense, masked = FrozenBase(_layer()), MaskedBase(_layer(), keep)
    quant = QuantizedBase(_layer(), 4, 16, keep)
    assert dense.macs_per_token() == 256 and masked.macs_per_token() == 96 and quant.macs_per_token() == 96
    assert masked.params() == 96 + 8 and dense.params() == 256 + 8
    assert dense.nbytes() == 256 * 4 + 8 * 4
    assert masked.weight_bytes() == 96 * 4 + 8 * 4 + 8 * 8  # values, one bit per position, int64 row offsets
    # nibbles in int32 words (4 per row), an fp32 scale per group (2 per row), zeros packed down the 8 rows
    assert quant.weight_bytes() == 8 * 4 * 4 + 8 * 2 * 4 + 1 * 2 * 4
    ad = ElasticLoRA(masked, 6, merge="plain")
    # a plain merge refills the pruned weights: merged, the layer costs its dense 256
    assert ad.macs_per_token(4) == 96 + 4 * (32 + 8) and ad.macs_per_token(4, merged=True) == 256
    assert ad.nbytes(4) == masked.nbytes() + 4 * 40 * 4 and ad.nbytes(4, merged=True) == 256 * 4 + 8 * 4
    folded = ElasticLoRA(MaskedBase(_layer(), keep), 6, merge="sparse")
    assert folded.macs_per_token(4) == 96 and folded.nbytes(4) == folded.base.nbytes()


def test_factors_stay_fp32_on_a_bf16_base():
    layer = _layer().to(torch.bfloat16)
    ad = ElasticLoRA(layer, 4)
    assert ad.lora_A.dtype == torch.float32 and ad.lora_B.dtype == torch.float32
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    out = ad(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert ad.lora_B.grad.dtype == torch.float32


def test_frozen_base_factory_and_shapes():
    assert type(frozen_base(_layer())) is FrozenBase
    assert type(frozen_base(_layer(), torch.ones(8, 32, dtype=torch.bool))) is MaskedBase
    assert type(frozen_base(_layer(), bits=8, group_size=32)) is QuantizedBase
    with pytest.raises(ValueError, match="does not fit"):
        MaskedBase(_layer(), torch.ones(32, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not divide"):
        QuantizedBase(_layer(), 4, 24)


# ------------------------------------------------------------------------------------ calibration
def test_calibration_norms_match_stored_activations():
    from conftest import tiny_bert_config
    from transformers import BertModel

    model = BertModel(tiny_bert_config()).eval()
    layers = {n: m for n, m in model.named_modules() if n.endswith("attention.self.query")}
    ids = torch.randint(5, 1000, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding is left out
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, inp[0].detach()))
             for n, m in layers.items()]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    norms, tokens = input_sq_norms(model, layers, [{"input_ids": ids, "attention_mask": mask}])
    assert tokens == int(mask.sum())
    for n, x in seen.items():
        expected = (x[mask.bool()].double() ** 2).sum(0)
        torch.testing.assert_close(norms[n], expected)
        assert not torch.allclose(norms[n], (x.double() ** 2).sum((0, 1)))  # padding would have changed it


def test_quantized_base_bytes_shrink():
    q4, q8 = QuantizedBase(_layer(out=64, inp=256), 4, 64), QuantizedBase(_layer(out=64, inp=256), 8, 64)
    groups = 64 * (256 // 64)
    assert q4.weight_bytes() == 64 * 256 // 2 + groups * 4 + groups // 2
    assert q8.weight_bytes() == 64 * 256 + groups * 4 + groups
    assert math.isclose(q4.describe()["sparsity"], 0.0)
