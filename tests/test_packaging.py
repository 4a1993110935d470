"""What ships around the code: one version everywhere, the licence, the type marker, the changelog."""

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import tformer
from tformer import _version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_one_version_everywhere():
    # pyproject.toml is the single source: the installed metadata is written from it and
    # tformer.__version__ reads the metadata (a stale install, e.g. after a version bump without
    # reinstalling, fails here).
    assert PYPROJECT["project"]["version"] == metadata.version("tformer") == tformer.__version__


def test_source_tree_fallback_reads_pyproject():
    assert _version._source_tree_version() == PYPROJECT["project"]["version"]


@pytest.mark.parametrize("command", [["tformer"], [sys.executable, "-m", "tformer"]], ids=["script", "module"])
def test_version_flag(command):
    if command == ["tformer"] and shutil.which("tformer") is None:
        pytest.skip("the tformer console script is not on PATH")
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tformer {metadata.version('tformer')}" == f"tformer {tformer.__version__}"


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 tformer contributors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}


def test_py_typed_ships_with_the_package():
    package_dir = Path(tformer.__file__).parent
    assert (package_dir / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["tformer"]


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog")
    assert "## [Unreleased]" in text
    assert f"## [{tformer.__version__}]" in text


def test_docs_extra_has_sphinx_and_myst():
    docs = " ".join(PYPROJECT["project"]["optional-dependencies"]["docs"])
    assert "sphinx" in docs and "myst-parser" in docs
