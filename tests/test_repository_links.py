"""Everything the repository links or names lives in the repository: a clone is self-contained."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile(re.escape(".." + "/shared") + "|" + re.escape("shared" + "/docs"))
MD_NAME = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh", ".json", ".html", ""}


def _tracked() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [REPO / name for name in out.split("\0") if name]


def _text_files() -> list[Path]:
    files = []
    for path in _tracked():
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not path.is_symlink():
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            files.append(path)
    return files


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in _text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, f"references outside the repository: {offenders}"


def test_every_markdown_file_named_is_in_the_repository() -> None:
    """A bare markdown file name in a docstring or document names a file we ship."""
    shipped = {path.name for path in _tracked()}
    missing = [
        f"{path.relative_to(REPO)}:{number}: {name}"
        for path in _text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for name in MD_NAME.findall(line)
        if name not in shipped
    ]
    assert not missing, f"documents named but not in the repository: {missing}"


def test_relative_markdown_links_resolve() -> None:
    broken = []
    for path in _text_files():
        if path.suffix != ".md":
            continue
        for target in MD_LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.exists() or REPO not in (resolved, *resolved.parents):
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, f"broken links: {broken}"
