"""``supernet.compress``: the maths of compressed frozen bases and their checkpoints.

Pure functions on tensors: Wanda and magnitude scores, unstructured and N:M masks
(:mod:`.sparsity`), asymmetric group-wise INT4/INT8 quantisation with a straight-through fake
quantiser (:mod:`.quant`); forward hooks that gather calibration statistics on any model
(:mod:`.calibration`); compressed-tensors checkpoints, written from our integers and masks and
loaded back as plain ``transformers`` models (:mod:`.ct`, :func:`load_compressed`).

Installed as ``supernet.compress`` (``package-dir`` in ``pyproject.toml``), never as a
top-level ``compress`` module. It imports no super-network code; ``supernet.bases`` and
``supernet.compressed_base`` apply it to a model.
"""

from .calibration import input_sq_norms
from .ct import load_compressed
from .quant import dequantize, fake_quantize, pack_int4, quant_params, quantize, unpack_int4
from .sparsity import magnitude_scores, nm_mask, prune_mask, unstructured_mask, wanda_scores

__all__ = [
    "dequantize", "fake_quantize", "input_sq_norms", "load_compressed", "magnitude_scores", "nm_mask", "pack_int4",
    "prune_mask", "quant_params", "quantize", "unpack_int4", "unstructured_mask", "wanda_scores",
]
