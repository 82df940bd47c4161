"""Where the files that ship with the package are: the SQL migrations and the runbooks.

Both live at the repository's top level. A built wheel (or sdist) carries a copy of each under
``delivery/_bundled/`` (setup.py makes it); a checkout or an editable install has none, and
reads the top-level directories themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

_PACKAGE = Path(__file__).resolve().parent

Bundled = Literal["migrations", "runbooks"]


def bundled_dir(name: Bundled) -> Path:
    copy = _PACKAGE / "_bundled" / name
    if copy.is_dir():
        return copy
    return _PACKAGE.parent / name
