"""Which code computed a result: a digest of the package's own source files.

Experiment results are cached under it, so a table never mixes results of different code
without saying so. It is read from the files themselves (not from git), so uncommitted edits
count and an installed copy without .git has one too. `experiment/tables.py` only formats
cached results and is left out: rewording a table does not invalidate what it shows.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PRESENTATION_ONLY = {"experiment/tables.py"}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in PRESENTATION_ONLY:
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]
