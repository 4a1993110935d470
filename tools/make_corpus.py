"""Rebuild tformer/corpus/python_docs.txt.gz from the documentation that ships with CPython.

    python tools/make_corpus.py

The corpus is the text of ``pydoc_data.topics`` (the Python reference manual's topics, in
English, under the PSF license), topics in sorted order separated by blank lines. The file in the
repository was made with CPython 3.11.7; other Python versions ship slightly different text, so
the committed file, pinned by its SHA-256 in ``tformer/data.py``, is what every run reads.
"""

import gzip
import hashlib
import sys
from pathlib import Path

from pydoc_data.topics import topics

text = "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"
data = text.encode("utf-8")
out = Path(__file__).resolve().parent.parent / "tformer" / "corpus" / "python_docs.txt.gz"
out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
print(f"{out}: {len(data)} bytes of text from Python {sys.version.split()[0]}, sha256 {hashlib.sha256(data).hexdigest()}")
