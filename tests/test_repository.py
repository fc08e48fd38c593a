"""The repository is self-contained: nothing a user clones points to files outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_tracked_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = "../" + "shared"  # spelled in two parts so that this file does not match itself
    hits = [p for p in tracked if (ROOT / p).is_file() and (ROOT / p).suffix in (".py", ".md", ".toml", ".cfg", "")
            and outside in (ROOT / p).read_text(errors="ignore")]
    assert hits == []


def test_docs_cited_in_the_code_exist():
    for name in ("METHODS.md", "ASSETS.md"):
        assert (ROOT / "docs" / name).is_file()
