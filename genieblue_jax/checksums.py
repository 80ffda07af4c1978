"""File checksums for checkpoints: what a restore reads is what the save wrote.

Orbax and TensorStore do not checksum what they write, so flipped bytes in a parameter or
Adam-moment file restore as a changed weight with no error. Every checkpoint we write
therefore records each file's size and SHA-256 (`record`), and every restore checks them first
(`damage`): a training step directory holds them in `checksums.json` (written after Orbax has
written the step and before it commits it: `genieblue_jax.train.trainer`), a model checkpoint
in its `genieblue.json` (`genieblue_jax.checkpoint`). Local or gs:// (`genieblue_jax.paths`).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "w.bin"), "wb").write(b"weights")
    >>> recorded = record(d)
    >>> recorded["w.bin"]["size"]
    7
    >>> damage(d, recorded)
    []
    >>> _ = open(os.path.join(d, "w.bin"), "r+b").write(b"W")
    >>> damage(d, recorded)
    ['w.bin: content differs from what was written (SHA-256)']
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from genieblue_jax import paths

MANIFEST = "checksums.json"
_CHUNK = 8 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint's files are not what was written: `path` is the checkpoint, `problems`
    name each damaged, missing or truncated file (relative to `path`)."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = str(path), list(problems)
        super().__init__(f"{self.path}: damaged checkpoint: {summary(self.problems)}")


def summary(problems: list[str], shown: int = 5) -> str:
    """The first `shown` problems joined, and how many more there are."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f" (+{more} more)" if more > 0 else "")


def _sha256(path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root) -> list[str]:
    """Paths of all files under `root`, relative, sorted."""
    root = paths.path(root)
    def bare(p):  # gcsfs's walk yields "bkt/dir" for gs://bkt/dir
        return os.fspath(p).split("://", 1)[-1].rstrip("/")

    top, out = bare(root), []
    for d, _, names in root.walk():  # epath: os.walk locally, the backend's walk on gs://
        sub = bare(d)[len(top):].lstrip("/")
        out += [f"{sub}/{n}" if sub else n for n in names]
    return sorted(out)


def record(root: str, *, exclude: Iterable[str] = ()) -> dict[str, dict]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file under `root` except the
    relative paths in `exclude` (files rewritten after the checksums are taken)."""
    root, exclude = paths.path(root), set(exclude)
    return {rel: {"size": (root / rel).stat().length, "sha256": _sha256(root / rel)}
            for rel in _files(root) if rel not in exclude}


def damage(root: str, recorded: dict[str, dict]) -> list[str]:
    """What differs between the files under `root` and `recorded` (from `record`): one line per
    missing, resized or changed file; [] when every recorded file is intact. Files that were
    not recorded are not checked."""
    root, problems = paths.path(root), []
    for rel, want in sorted(recorded.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().length
        if size != want["size"]:
            problems.append(f"{rel}: {size} bytes, {want['size']} were written")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{rel}: content differs from what was written (SHA-256)")
    return problems


def write_manifest(root: str, *, exclude: Iterable[str] = ()) -> None:
    """Records the files under `root` in `root/checksums.json`."""
    files = record(root, exclude=set(exclude) | {MANIFEST})
    (paths.path(root) / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def manifest_damage(root: str) -> list[str] | None:
    """`damage` against `root/checksums.json`; None when there is no manifest (a checkpoint
    written before checksums were recorded: it cannot be verified)."""
    path = paths.path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    return damage(root, files)


def checked_by_primary(check) -> list[str] | None:
    """`check()` (a `damage`-style verdict: problems, [] or None) run by process 0 alone, its
    verdict returned on every process, so that all processes raise or none does (one host
    reads the files, not all of them)."""
    import jax
    if jax.process_count() == 1:
        return check()
    import numpy as np
    from jax.experimental import multihost_utils
    problems = check() if jax.process_index() == 0 else None
    code = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if problems is None else len(problems))))
    if jax.process_index() == 0:
        return problems
    return None if code < 0 else [f"{code} damaged files (listed by process 0)"] if code else []
