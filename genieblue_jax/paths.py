"""The one path layer: every file the framework reads or writes is named through `path()`
(etils.epath), so a workdir, a checkpoint, a dataset or an export can live on local disk or
on Cloud Storage (`gs://`, through gcsfs) alike; Orbax and Grain take the same paths.

A scheme nothing here serves is an error naming the path, never a local directory with a
colon in its name (`gs:/bucket/run` with one slash, or `foo://x`, would otherwise become
`./gs:/bucket/run` on the VM's disk, lost with the VM).

    >>> str(path("gs://bucket/run") / "checkpoints")
    'gs://bucket/run/checkpoints'
    >>> path("runs/a").is_absolute()      # local paths are made absolute
    True
    >>> path("gs:/bucket/run")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: gs:/bucket/run: not a path genieblue_jax can use (a URL needs scheme://; supported: gs://, s3://, ...)
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Iterable, Iterator

from etils import epath

# Schemes etils.epath serves (gcsfs / s3fs). Everything else with a colon is refused.
REMOTE_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path: a gs:// / s3:// URL as it is, a local path made absolute.

    Raises ValueError naming `p` for a scheme other than REMOTE_SCHEMES, or a scheme
    without `//`."""
    s = os.fspath(p)
    m = _URL.match(s)
    if m and not (len(m.group(1)) == 1 and os.name == "nt"):  # "C:\..." is a Windows drive, not a scheme
        if m.group(1) not in REMOTE_SCHEMES or not m.group(2):
            raise ValueError(f"{s}: not a path genieblue_jax can use (a URL needs scheme://; supported: "
                             f"{', '.join(f'{x}://' for x in REMOTE_SCHEMES)}, or a local path)")
        return epath.Path(s)
    return epath.Path(os.path.abspath(s))


def is_remote(p: str | os.PathLike) -> bool:
    """True for gs:// / s3:// paths (not on this machine's disk)."""
    return bool(_URL.match(os.fspath(p))) and os.fspath(p).split(":", 1)[0] in REMOTE_SCHEMES


def join(p: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that keeps a URL's scheme: the string form of `path(p) / parts...`."""
    return os.fspath(path(p).joinpath(*parts))


def local_dir(p: str | os.PathLike) -> str:
    """`p` as an absolute local path, for outputs that must be written on this machine's disk
    (exports staged and renamed into place, ONNX / AIMET files; `written_locally` brings them to
    a remote destination). Raises ValueError naming `p` for a gs:// / s3:// path (write
    locally, then copy: `gcloud storage cp -r DIR URL`) and, through `path()`, for any other
    scheme.

        >>> local_dir("gs://bucket/export")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: gs://bucket/export: written on local disk only; write to a local directory, then copy it ...
    """
    if is_remote(p):
        raise ValueError(f"{os.fspath(p)}: written on local disk only; write to a local directory, then copy it "
                         f"(gcloud storage cp -r DIR {os.fspath(p)})")
    return os.fspath(path(p))


@contextlib.contextmanager
def written_locally(url: str, *, replace: Iterable[str], overwrite: bool, prefix: str) -> Iterator[str]:
    """For writers that need files on this machine's disk (PyTorch / ONNX / AIMET exports) and
    a remote destination: yields a fresh local directory (under the system's TMPDIR) to write
    into; when the block succeeds, removes the names in `replace` directly under `url` (an
    earlier export's parts), copies every file of the local directory there (etils.epath) and
    deletes the local copy. A failed block leaves `url` as it was.

    Raises FileExistsError naming `url` when it is a file, or a non-empty directory without
    `overwrite`, before the block runs."""
    out = path(url)
    if out.is_file():
        raise FileExistsError(f"{url} exists and is not a directory")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise FileExistsError(f"{url} already exists and is not empty ({existing[:6]}); pass --overwrite "
                              f"(overwrite=True) to replace the export in it")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        local = os.path.join(tmp, "out")
        yield local
        for name in replace:
            old = out / name
            if old.is_dir():
                old.rmtree()
            elif old.exists():
                old.unlink()
        for root, _, names in os.walk(local):
            for name in sorted(names):
                dst = out.joinpath(*os.path.relpath(os.path.join(root, name), local).split(os.sep))
                dst.parent.mkdir(parents=True, exist_ok=True)
                path(os.path.join(root, name)).copy(dst)
