"""The documentation site (docs/site) builds in Sphinx's strict mode and covers the public API and the README."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import tformer

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "docs" / "site"


def test_strict_build(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path / "html"
    # -W: every warning fails; -n: every cross-reference must resolve; -E: no cached environment.
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-E", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(SITE), str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ["index", "api/tformer", "guides/quickstart", "results/reproductions"]:
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api" / "tformer.html").read_text(encoding="utf-8")
    for name in ("BlockConfig", "LanguageModel", "make_scheduler", "save", "from_torch"):
        assert f'id="tformer.{name}"' in api, name


def test_every_public_name_is_on_the_api_page():
    page = (SITE / "api" / "tformer.rst").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. (?:auto)?(?:class|function|exception|data):: tformer\.(\w+)", page, re.M))
    assert set(tformer.__all__) - documented == set()


def test_every_readme_section_has_a_guide_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S)  # headings inside code blocks are comments
    sections = re.findall(r"^## (.+?)\s*$", readme, re.M)
    included = set()
    for page in (SITE / "guides").glob("*.md"):
        included.update(re.findall(r"^:start-after: <!-- section: (.+?) -->$", page.read_text(encoding="utf-8"), re.M))
    assert sections and [s for s in sections if s not in included] == []


def test_build_output_is_ignored_by_git():
    assert "docs/site/_build/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
