"""What Python 3.10 lacks from 3.11's standard library, in one place.

echod runs on Python >= 3.10 (JetPack 6 ships 3.10): ``tomllib`` is the
standard library's from 3.11 and its original, ``tomli``, before.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the Python 3.10 CI run
    import tomli as tomllib

__all__ = ["tomllib"]
