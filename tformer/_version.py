"""The package version, with ``pyproject.toml`` as its single source.

An installed tformer (wheel or editable) reports the version pip recorded from ``pyproject.toml``
(``importlib.metadata``), so ``tformer.__version__``, ``tformer --version`` and ``pip show tformer``
always agree. A source tree used without installing reads ``pyproject.toml`` beside the package.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path


def _source_tree_version() -> str:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (ImportError, OSError, KeyError, ValueError):  # Python 3.10, or not a source tree
        return "0+unknown"


try:
    __version__ = metadata.version("tformer")
except metadata.PackageNotFoundError:
    __version__ = _source_tree_version()
