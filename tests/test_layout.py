"""The layout stays what the README says: light imports, one module per command, one source of truth
for the search defaults and for the lists of strategies and objectives."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

import supernet
from supernet import commands
from supernet.cli import build_parser
from supernet.commands.search import EVAL_SAMPLES
from supernet.search import OBJECTIVES, STRATEGIES, SearchSettings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PACKAGES = {"supernet": ROOT / "supernet", "search": ROOT / "search", "compress": ROOT / "compress"}


def _loaded(statement: str, modules: tuple[str, ...]) -> dict[str, bool]:
    """Which of ``modules`` are in sys.modules after ``statement``, in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint(' '.join(str(m in sys.modules) for m in {modules!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(zip(modules, (w == "True" for w in out.stdout.split()), strict=True))


# ----------------------------------------------------------------------------- light imports
@pytest.mark.parametrize("statement,heavy", [
    ("import supernet.search", ("torch", "transformers")),
    ("import supernet.plot_data", ("torch", "transformers", "matplotlib")),
    ("import supernet.compress", ("transformers",)),
    ("import supernet", ("torch", "transformers", "pandas")),
    ("from supernet.cli import build_parser; build_parser()", ("torch", "transformers")),
])
def test_light_imports(statement, heavy):
    loaded = _loaded(statement, heavy)
    assert not any(loaded.values()), f"{statement!r} imports {[m for m, on in loaded.items() if on]}"


def test_the_subprocess_check_can_fail():
    assert _loaded("import supernet.network", ("torch", "transformers")) == {"torch": True, "transformers": True}


def test_public_names_resolve_on_first_use():
    for name in supernet.__all__:
        assert getattr(supernet, name).__name__ == name
    assert set(supernet.__all__) == set(supernet._EXPORTS)
    with pytest.raises(AttributeError):
        supernet.no_such_name  # noqa: B018
    from supernet import SuperNetwork  # the old spelling works

    assert SuperNetwork is supernet.SuperNetwork


# ----------------------------------------------------------------------------- one module per command
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_its_module():
    assert tuple(_subcommands()) == commands.COMMANDS
    for name in commands.COMMANDS:
        assert (PACKAGES["supernet"] / "commands" / f"{name}.py").is_file()
        module = __import__(f"supernet.commands.{name}", fromlist=["run"])
        assert callable(module.run)


def test_no_library_module_is_named_after_a_command():
    for name in ("searching", "exporting", "evaluate", "plotting", "training"):
        assert not (PACKAGES["supernet"] / f"{name}.py").exists()


def test_no_module_name_is_used_twice():
    """Once ``search/run.py`` and ``supernet/run.py``, ``search/space.py`` and ``supernet/space.py``
    shared a name; now every module name is used once across the three packages."""
    names = {pkg: {p.name for p in d.glob("*.py") if p.name != "__init__.py"}
             for pkg, d in PACKAGES.items()}
    assert names["supernet"] & names["search"] == set()
    assert names["supernet"] & names["compress"] == set()
    assert names["search"] & names["compress"] == set()


#: every library file: the layout asks for files a reader takes in at once (~400 lines)
LIBRARY = sorted(str(p.relative_to(ROOT)) for d in ("supernet", "search", "compress") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY)
def test_files_stay_short(path):
    assert len((ROOT / path).read_text().splitlines()) <= 420


# ----------------------------------------------------------------------------- the README's layout
def _layout_paths() -> set[str]:
    block = README.split("## Layout", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack = [*stack[:depth], name]
        paths.add("".join(stack).rstrip("/"))
    return paths


def test_readme_layout_names_every_library_file():
    actual = set()
    for pkg, d in PACKAGES.items():
        actual.add(pkg)
        for p in d.rglob("*.py"):
            rel = p.relative_to(ROOT)  # a sub-package's line stands for its __init__.py
            actual.add(str(rel.parent) if p.name == "__init__.py" and p.parent != d else str(rel))
    listed = {p for p in _layout_paths() if p.split("/")[0] in PACKAGES}
    assert sorted(actual - listed) == [], "library files the README's layout does not name"
    assert sorted(listed - actual) == [], "files the README's layout names that do not exist"


# ----------------------------------------------------------------------------- search defaults
def _search_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in _subcommands()["search"]._actions}


def test_search_defaults_agree_in_settings_help_and_readme(monkeypatch):
    defaults = {f.name: f.default for f in dataclasses.fields(SearchSettings)}
    expected = {"population": defaults["population"], "evaluations": defaults["evaluations"],
                "seed": defaults["seed"], "algorithm": defaults["algorithm"], "eval_samples": EVAL_SAMPLES}
    actions = _search_actions()
    for dest, value in expected.items():
        assert actions[dest].help.endswith(f"[{value}]") or f"[{value}]:" in actions[dest].help, dest
        assert actions[dest].default is None  # the value comes from SearchSettings, not from argparse
    assert actions["objectives"].help.endswith(f"[{','.join(defaults['objectives'])}]")
    lines = README.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("supernet search "))
    line = lines[i] + lines[i + 1]  # the synopsis and its continuation line
    given = {m.group(1).replace("-", "_"): m.group(2) for m in re.finditer(r"\[--([a-z-]+) ([^\]\s]+)\]", line)}
    assert {k: v for k, v in given.items() if k in expected} == {k: str(v) for k, v in expected.items()}
    assert f"--objectives {','.join(defaults['objectives'])}" in line
    monkeypatch.setenv("COLUMNS", "400")
    text = _subcommands()["search"].format_help()
    assert f"configurations per generation [{defaults['population']}]" in text


def test_search_defaults_are_those_of_a_search_without_flags():
    assert (SearchSettings().population, SearchSettings().evaluations) == (16, 96)  # the documented values


# ----------------------------------------------------------------------------- registries
def _readme_bullet(title: str) -> list[str]:
    start = README.index(f"- **{title}**")
    end = README.index("\n- **", start + 1)
    return [t for t in re.findall(r"`([^`]+)`", README[start:end]) if re.fullmatch(r"[a-z][a-z0-9_]*", t)]


def _docstring_paragraph(title: str) -> list[str]:
    doc = ast.get_docstring(ast.parse((PACKAGES["search"] / "__init__.py").read_text()))
    paragraph = next(p for p in doc.split("\n\n") if p.startswith(title))
    return [t for t in re.findall(r"``([^`]+)``", paragraph) if t != t.upper()]


def test_readme_and_docstring_name_every_strategy():
    assert _readme_bullet("Strategies") == list(STRATEGIES)
    assert _docstring_paragraph("Strategies") == list(STRATEGIES)
    assert len(STRATEGIES) == 12


def test_readme_and_docstring_name_every_objective():
    assert list(dict.fromkeys(_readme_bullet("Objectives"))) == list(OBJECTIVES)
    assert _docstring_paragraph("Objectives") == list(OBJECTIVES)


def test_algorithm_help_lists_the_registry():
    text = _search_actions()["algorithm"].help
    named = re.findall(r"(?:^|; |: )([a-z0-9]+) = ", text)
    assert named == list(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert f"{name} = {strategy.description}" in text


def test_objectives_help_lists_the_registry():
    text = _search_actions()["objectives"].help
    listed = text.split("two or more of ", 1)[1].rsplit(", comma-separated", 1)[0]
    names = [re.sub(r" \(.*\)$", "", item) for item in re.split(r", (?![^(]*\))", listed)]
    assert names == list(OBJECTIVES)
