"""Compressed frozen bases for a run: calibrate, prune (Wanda / magnitude, unstructured or N:M),
quantise (group-wise INT4/INT8), and keep what is needed to rebuild them exactly.

The maths are the pure functions of :mod:`supernet.compress`; this module applies them to a
model's target layers. The masks are the one thing that depends on calibration data and
floating-point reduction order, so a run stores them (bit-packed, ``compression.safetensors``)
and every later ``eval``/``search``/``export``/``--resume`` reuses them; the quantisation grid is
a deterministic function of the pruned weight and is recomputed. The run's ``config.json`` records
a fingerprint of its masks (:func:`masks_fingerprint`), so that a mask file of another run is refused.

Wanda's statistics are gathered in one of two orders (``--calibration-order``): ``sequential``,
the reference's block by block order, where each block is scored on the outputs of the blocks
before it *already pruned*, or ``dense``, one pass over the unpruned model for every layer (the
default: measured on MiniLM at 50 %, the two tie in accuracy after training and ``dense`` keeps
the pruned model slightly closer to the dense one, ``results/wanda_order.md``; it is also the
only order before the option existed, so a run whose ``config.json`` names none was built with it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from supernet.bases import FrozenBase, frozen_base, layer_shape, linear_weight
from supernet.compress.calibration import input_sq_norms, sequential_sq_norms
from supernet.compress.quant import BITS
from supernet.compress.sparsity import parse_pattern, prune_mask
from supernet.errors import SupernetError
from supernet.runfiles import save_tensors
from supernet.tasks import Encoded, collate, rows_of

MASKS = "compression.safetensors"
PRUNERS = ("wanda", "magnitude")
ORDERS = ("sequential", "dense")  # --calibration-order; see the module's docstring
LEGACY_ORDER = "dense"  # the order of runs recorded before --calibration-order existed


@dataclass(frozen=True)
class Compression:
    """How the frozen base is compressed before the adapters are trained.

    Args:
        sparsity: fraction of each row's weights removed (an N:M pattern implies ``1 - N/M``).
        prune: ``wanda`` (``|W| * ||X_j||``, calibrated) or ``magnitude`` (``|W|``).
        pattern: ``unstructured`` or ``N:M`` (``2:4``, ``4:8``: N kept in every M inputs).
        bits: 4 or 8 for an integer base; None keeps it in floating point.
        group_size: input columns per ``(scale, zero)``.
        calibration_samples: training sequences Wanda's statistics are gathered on.
        calibration_order: ``sequential`` (block by block through the blocks already pruned, as
            the reference Wanda) or ``dense`` (every layer's statistics from the unpruned model,
            one pass). Only Wanda calibrates: magnitude pruning ignores it.
    """

    sparsity: float = 0.0
    prune: str = "wanda"
    pattern: str = "unstructured"
    bits: int | None = None
    group_size: int = 64
    calibration_samples: int = 128
    calibration_order: str = "dense"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise SupernetError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.prune not in PRUNERS:
            raise SupernetError(f"unknown --prune {self.prune!r}; choose one of {', '.join(PRUNERS)}")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise SupernetError(str(e)) from None
        if nm is not None and self.sparsity != 0.0 and not math.isclose(self.sparsity, 1 - nm[0] / nm[1],
                                                                          abs_tol=1e-3):
            raise SupernetError(f"--pattern {self.pattern} removes {1 - nm[0] / nm[1]:g} of the weights, "
                                f"but --sparsity is {self.sparsity:g}")
        if self.bits is not None and self.bits not in BITS:
            raise SupernetError(f"--bits must be 4 or 8, got {self.bits}")
        if self.group_size <= 0:
            raise SupernetError(f"--group-size must be positive, got {self.group_size}")
        if self.calibration_samples <= 0:
            raise SupernetError(f"--calibration-samples must be positive, got {self.calibration_samples}")
        if self.calibration_order not in ORDERS:
            raise SupernetError(f"unknown --calibration-order {self.calibration_order!r}; choose one of "
                                f"{', '.join(ORDERS)}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def ratio(self) -> float:
        """The sparsity actually applied."""
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    @property
    def prunes(self) -> bool:
        return self.ratio > 0

    @property
    def active(self) -> bool:
        return self.prunes or self.bits is not None

    @property
    def calibrates(self) -> bool:
        return self.prunes and self.prune == "wanda"


def check_layers(targets: Mapping[str, nn.Module], comp: Compression) -> None:
    """Refuse layer widths the pattern or the group size cannot tile, before any work."""
    for name, layer in targets.items():
        width = layer_shape(layer)[0]
        if comp.nm and width % comp.nm[1]:
            raise SupernetError(f"--pattern {comp.pattern}: the width {width} of {name} is not divisible by "
                                f"{comp.nm[1]}")
        if comp.bits is not None and width % comp.group_size:
            raise SupernetError(f"--group-size {comp.group_size} does not divide the width {width} of {name}")


def calibration_batches(enc: Encoded, samples: int, seed: int, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """``samples`` training sequences drawn with ``seed`` (without replacement), batched."""
    train = enc.splits["train"]
    if samples > len(train):
        raise SupernetError(f"--calibration-samples {samples} exceeds the {len(train)} examples of the train split")
    order = np.random.default_rng(seed).permutation(len(train))[:samples]
    return [collate(enc, rows_of(train, order[i:i + batch_size])) for i in range(0, samples, batch_size)]


def compute_masks(model: nn.Module, targets: Mapping[str, nn.Module], comp: Compression,
                  batches: list[dict] | None, progress: bool = False,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The keep-mask of every target layer (Wanda scores from calibration batches, or magnitude).

    Wanda's statistics are gathered in ``comp.calibration_order``: ``dense``, one pass over the
    unpruned model; ``sequential``, block by block, each block's layers pruned (their weights
    zeroed where the mask drops them) before the next block's pass. The model's weights are
    restored afterwards either way: pruning them for good is :func:`make_bases`'s work.

    ``device``: run the calibration forward passes there (a GPU when there is one); the model
    is moved back where it was afterwards.
    """
    norms: Mapping[str, torch.Tensor] = {}
    if comp.calibrates:
        if not batches:
            raise SupernetError("Wanda pruning needs calibration batches")
        home = next(model.parameters()).device
        device = torch.device(device) if device is not None else home
        model.to(device)
        try:
            moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
            if comp.calibration_order == "dense":
                norms, _ = input_sq_norms(model, targets, moved, progress=progress)
            else:
                return _sequential_masks(model, targets, comp, moved, progress)
        finally:
            model.to(home)
    masks = {}
    for name, layer in targets.items():
        w = linear_weight(layer)
        n = norms.get(name)
        masks[name] = prune_mask(w, None if n is None else n.to(w.device), comp.ratio, comp.pattern).cpu()
    return masks


def _sequential_masks(model: nn.Module, targets: Mapping[str, nn.Module], comp: Compression,
                      batches: list[dict], progress: bool) -> dict[str, torch.Tensor]:
    """:func:`compute_masks` in the ``sequential`` order: each block is pruned (in place) as soon
    as its statistics are in, so that the next block's pass sees the pruned network; every
    dropped weight is put back at the end, even when a pass fails."""
    masks: dict[str, torch.Tensor] = {}
    dropped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name: (drop mask, the values it zeroed)

    @torch.no_grad()
    def prune(norms: dict[str, torch.Tensor]) -> None:
        for name, n in norms.items():
            w = linear_weight(targets[name])  # a view for Conv1D: writing into it writes the layer
            keep = prune_mask(w, n.to(w.device), comp.ratio, comp.pattern)
            masks[name] = keep.cpu()
            drop = ~keep.to(w.device)
            dropped[name] = (drop, w[drop].clone())
            w[drop] = 0

    try:
        sequential_sq_norms(model, targets, batches, prune, progress=progress)
    finally:
        with torch.no_grad():
            for name, (drop, values) in dropped.items():
                linear_weight(targets[name])[drop] = values
    return {name: masks[name] for name in targets}


def make_bases(targets: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor] | None,
               comp: Compression, merge: str = "plain") -> dict[str, FrozenBase]:
    """The frozen base of every target layer (each layer's weight is pruned / quantised in place).
    A quantised base keeps its fp32 pre-quantisation weight only for ``qa-sparse``, which trains through it."""
    bases = {name: frozen_base(layer, None if masks is None else masks[name], comp.bits, comp.group_size,
                               keep_source=merge == "qa-sparse")
             for name, layer in targets.items()}
    for base in bases.values():
        base.pattern = comp.pattern if comp.prunes else None
    return bases


def _packed(mask: torch.Tensor) -> np.ndarray:
    """One bit per weight, each row padded to whole bytes (the layout of the mask file)."""
    return np.packbits(mask.detach().cpu().numpy().astype(bool), axis=1)


def masks_fingerprint(masks: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the masks' names, shapes and bits, in name order.

    It hashes the content, not the file's bytes, so that it does not depend on how safetensors
    lays out (or a later version re-lays out) the same masks.
    """
    h = hashlib.sha256()
    for name in sorted(masks):
        # the JSON header is unambiguous, and the shape fixes how many packed bytes follow it
        h.update(json.dumps([name, list(masks[name].shape)]).encode())
        h.update(_packed(masks[name]).tobytes())
    return h.hexdigest()


def save_masks(path: Path, masks: Mapping[str, torch.Tensor]) -> str:
    """Bit-packed masks (one bit per weight) with their shapes in the metadata; written atomically.

    Returns:
        The masks' :func:`masks_fingerprint`, for the run's ``config.json``.
    """
    packed = {n: torch.from_numpy(_packed(m)) for n, m in masks.items()}
    shapes = {n: list(m.shape) for n, m in masks.items()}
    save_tensors(path, packed, metadata={"shapes": json.dumps(shapes)})
    return masks_fingerprint(masks)


def load_masks(path: Path, targets: Mapping[str, nn.Module], fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    """Masks saved by :func:`save_masks`, checked against the target layers.

    Args:
        path: the run's mask file.
        targets: the layers the masks belong to (names and shapes are checked).
        fingerprint: the :func:`masks_fingerprint` the run recorded when it saved its masks; the
            loaded masks must have it. None (a run written before fingerprints were recorded)
            skips the check: nothing is known to compare with.

    Raises:
        SupernetError: the file is missing, unreadable, does not fit the layers, or holds
            masks other than the run's own.
    """
    if not path.is_file():
        raise SupernetError(f"{str(path)!r} is missing: the run's pruning masks cannot be rebuilt without it")
    try:
        with safe_open(str(path), "pt") as f:
            shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
            masks = {}
            for name, layer in targets.items():
                if name not in f.keys() or name not in shapes:
                    raise SupernetError(f"{str(path)!r} has no mask for {name}")
                fan_in, fan_out = layer_shape(layer)
                packed = f.get_slice(name).get_shape()
                if shapes[name] != [fan_out, fan_in] or packed != [fan_out, math.ceil(fan_in / 8)]:
                    raise SupernetError(f"{str(path)!r}: the mask of {name} has shape {shapes[name]}, "
                                        f"the layer {[fan_out, fan_in]}")
                bits = np.unpackbits(f.get_tensor(name).numpy(), axis=1, count=fan_in)
                masks[name] = torch.from_numpy(bits.astype(bool))
    except SupernetError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise SupernetError(f"cannot read {str(path)!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if fingerprint is not None and masks_fingerprint(masks) != fingerprint:
        # e.g. copied from another run: every number computed on these masks would be wrong
        raise SupernetError(f"{str(path)!r} does not belong to this run: its pruning masks differ from the ones "
                            "the run recorded in config.json (was it copied from another run?)")
    return masks
