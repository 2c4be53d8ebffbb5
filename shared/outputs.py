"""Stage globs under the state directory (`requires`, `outputs`): whether they match. The runner checks
them around a stage; the scheduler checks declared outputs before a re-run from a failed stage."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path


def first_match(home: Path, pattern: str) -> str | None:
    """The first path under home matching the glob (`**` spans directories), or None."""
    for hit in glob.iglob(os.path.join(glob.escape(str(home)), pattern), recursive=True):
        return hit
    return None


def missing_outputs(home: Path, patterns: Iterable[str]) -> list[str]:
    """The globs of `patterns` that match nothing under home."""
    return [p for p in patterns if first_match(home, p) is None]
