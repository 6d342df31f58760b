"""SHA-256 checksums of a checkpoint step's files: written when the step is committed, verified before a restore.

    write(step_dir)            -> <step_dir>/checksums.json  {'algorithm', 'files': {relative path: hex digest}}
    verify(step_dir) -> None | str   None if every file matches, else one phrase naming the first difference

Covered: every file under the item directories (state/ = arrays, data/ = the data iterator's position, meta/),
so any changed, truncated, missing or added file is found. orbax's own bookkeeping at the step's top level
(_CHECKPOINT_METADATA, commit markers) is not covered: orbax may rewrite it, and it holds no training state.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

FILENAME = "checksums.json"
ITEMS = ("state", "data", "meta")
_CHUNK = 8 * 2 ** 20


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Relative paths of the covered files, sorted."""
    out = []
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            out.extend(os.path.relpath(os.path.join(root, n), step_dir) for n in names)
    return sorted(out)


def compute(step_dir: str) -> dict:
    return {"algorithm": "sha256", "files": {rel: _digest(os.path.join(step_dir, rel)) for rel in _files(step_dir)}}


def write(step_dir: str) -> None:
    """Writes <step_dir>/checksums.json (atomically: a killed writer leaves no half file)."""
    tmp = os.path.join(step_dir, FILENAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(compute(step_dir), f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, FILENAME))


def has_checksums(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, FILENAME))


def verify(step_dir: str) -> Optional[str]:
    """None if the files match checksums.json; else what differs ('state/d/ab12: checksum differs', ...)."""
    try:
        with open(os.path.join(step_dir, FILENAME)) as f:
            want = json.load(f)["files"]
        if not isinstance(want, dict):
            raise ValueError("no file table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{FILENAME} is unreadable ({type(e).__name__})"
    have = _files(step_dir)
    for rel in sorted(set(want) - set(have)):
        return f"{rel} is missing"
    for rel in sorted(set(have) - set(want)):
        return f"{rel} was not part of the checkpoint"
    for rel in have:
        try:
            if _digest(os.path.join(step_dir, rel)) != want[rel]:
                return f"{rel}: checksum differs"
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror})"
    return None
